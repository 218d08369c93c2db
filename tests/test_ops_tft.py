"""``fastxai::tft_ladder`` / ``tft_ladder_out`` / ``tft_mask`` and ``fastxai::rpi_select``.

Every kernel (C++, and Triton, under the interpreter without a GPU) against
:mod:`fastxai.ops.reference`; tests whose assertions do not go through the reference (NaN
thresholds, tie order, the ``out=`` buffer, the selected index on ties, errors) also run the
reference itself:

* the ladder's map equals ``reference.scale_maps`` within 1e-6 (float32) / 1e-12 (float64); its
  masked batch equals ``reference.tft_mask`` of the backend's own map exactly, and the masks
  differ from the all-reference ones only where :math:`|I - \\tau| \\le` that tolerance (value mode)
  or the pixel is that close to the pivot (percentile mode, which mutes exactly
  :math:`\\lfloor q H W \\rfloor` pixels);
* ``tft_mask`` (no map to compute) equals the reference exactly;
* ``rpi_select`` within 1e-6 / 1e-12 relative to ``1 + RPI``; its index equals the reference's
  first argmax, -1 when every RPI is 0.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from conftest import TRITON_ON_CPU, run_without_extension, triton_as_cpu_kernel

import fastxai.ops as ops
from fastxai.ops import reference
from fastxai.ops._dispatch import CUDA_KERNELS

ATOL = {torch.float32: 1e-6, torch.float64: 1e-12}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
HAS_GPU = torch.cuda.is_available()

requires_extension = pytest.mark.skipif(
    not ops.has_extension(), reason=f"C++ ops not available: {ops.extension_status()}"
)
requires_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU on this machine")

# Triton runs on the GPU when there is one, else under TRITON_INTERPRET=1 on CPU tensors
# (tests/conftest.py).
BACKENDS = [
    pytest.param("cpp", marks=requires_extension),
    pytest.param("triton", marks=requires_triton),
]
BACKENDS_AND_REFERENCE = [*BACKENDS, "torch"]
PAPER_LADDER = [i / 10 for i in range(10)]
PERCENTILE_LADDER = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]


def _device(backend: str) -> str:
    """Where ``backend`` runs its kernels here: Triton and, when built with CUDA, the C++ ops on
    the GPU when there is one."""
    on_gpu = backend == "triton" or (backend == "cpp" and CUDA_KERNELS["tft_ladder"])
    return "cuda" if on_gpu and HAS_GPU else "cpu"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ladder(mode: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(PAPER_LADDER if mode == "value" else PERCENTILE_LADDER, dtype=dtype)


def _keep_masks(maps: torch.Tensor, thresholds: torch.Tensor, mode: str) -> torch.Tensor:
    """The reference's keep masks ``(N, T, H, W)``: the binary batch of an all-ones image."""
    n, height, width = maps.shape
    ones = torch.ones(n, 1, height, width, dtype=maps.dtype)
    masked = reference.tft_mask(maps, ones, thresholds, mode, "binary")
    return masked.view(n, thresholds.shape[0], height, width) != 0


def _on(device: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(device) for t in tensors]


def _check_ladder(backend, raw, images, thresholds, mode, mask, out=None):
    """Runs the ladder on ``backend`` and checks it against the reference; returns its outputs."""
    device = _device(backend)
    raw_d, images_d, thresholds_d = _on(device, raw, images, thresholds)
    out_d = None if out is None else out.to(device)
    masked, maps = ops.tft_ladder(
        raw_d, images_d, thresholds_d, mode=mode, mask=mask, out=out_d, backend=backend
    )
    if out_d is not None:
        assert masked is out_d
    masked, maps = masked.cpu(), maps.cpu()
    n, channels, height, width = images.shape
    t = thresholds.shape[0]
    assert masked.shape == (n * t, channels, height, width) and masked.dtype == images.dtype
    assert maps.shape == (n, height, width) and maps.dtype == raw.dtype

    if backend == "torch":  # the reference itself: the caller's own assertions only
        return masked, maps
    atol = ATOL[raw.dtype]
    expected_maps = reference.scale_maps(raw, height, width)
    torch.testing.assert_close(maps, expected_maps, atol=atol, rtol=0)
    # Given its own map, the masking is exact.
    assert torch.equal(masked, reference.tft_mask(maps, images, thresholds, mode, mask))

    keep = _keep_masks(maps, thresholds, mode)
    expected_keep = _keep_masks(expected_maps, thresholds, mode)
    differs = keep != expected_keep
    if mode == "value":
        tau = thresholds.to(raw.dtype)[None, :, None, None]
        near = ((expected_maps[:, None] - tau).abs() <= atol) | (expected_maps[:, None] <= atol)
    else:
        pixels = height * width
        muted = torch.floor(thresholds.double() * pixels).long().clamp(0, pixels)
        assert torch.equal((~keep).flatten(2).sum(2), muted.expand(n, t)), "muted counts"
        ordered = expected_maps.flatten(1).sort(dim=1).values
        pivot = ordered[:, muted.clamp(max=pixels - 1)][:, :, None, None]
        near = (expected_maps[:, None] - pivot).abs() <= 2 * atol
    assert not (differs & ~near).any(), f"{int((differs & ~near).sum())} masks differ beyond tol"
    return masked, maps


# (N, h, w, C, H, W)
LADDER_SHAPES = [
    pytest.param(2, 7, 7, 3, 32, 32, id="square-up"),
    pytest.param(3, 5, 9, 3, 17, 13, id="odd-nonsquare"),
    pytest.param(1, 7, 7, 1, 24, 20, id="one-image-one-channel"),
    pytest.param(2, 30, 40, 2, 11, 7, id="down"),
    pytest.param(2, 6, 6, 3, 6, 6, id="same-size"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
@pytest.mark.parametrize(("n", "h", "w", "c", "height", "width"), LADDER_SHAPES)
def test_ladder_matches_reference(backend, dtype, n, h, w, c, height, width):
    g = _generator(n * 1000 + h * 100 + w)
    raw = torch.randn(n, h, w, dtype=dtype, generator=g)
    images = torch.randn(n, c, height, width, dtype=dtype, generator=g)
    for mode in ("value", "percentile"):
        for mask in ("binary", "soft"):
            _check_ladder(backend, raw, images, _ladder(mode), mode, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
def test_ladder_edge_cases(backend, dtype):
    g = _generator(3)
    raw = torch.randn(2, 5, 4, dtype=dtype, generator=g)
    images = torch.randn(2, 3, 9, 11, dtype=dtype, generator=g)
    for mode in ("value", "percentile"):
        one = torch.tensor([0.35], dtype=torch.float64)  # T = 1
        _check_ladder(backend, raw, images, one, mode, "soft")
        # Empty batch, and an empty ladder.
        masked, maps = _check_ladder(backend, raw[:0], images[:0], _ladder(mode), mode, "binary")
        assert masked.shape == (0, 3, 9, 11) and maps.shape == (0, 9, 11)
        masked, _ = _check_ladder(backend, raw, images, one[:0], mode, "binary")
        assert masked.shape == (0, 3, 9, 11)
    # Random value thresholds in float32 (compared in the maps' dtype), out of [0, 1] included.
    thresholds = torch.tensor([0.73, -0.5, 0.0, 1.5, 0.2], dtype=torch.float32)
    _check_ladder(backend, raw, images, thresholds, "value", "binary")


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
def test_ladder_non_contiguous_inputs(backend, dtype):
    g = _generator(11)
    raw = torch.randn(3, 9, 6, dtype=dtype, generator=g).transpose(1, 2)
    channels_last = torch.randn(3, 14, 10, 3, dtype=dtype, generator=g).permute(0, 3, 1, 2)
    sliced = torch.randn(3, 4, 28, 10, dtype=dtype, generator=g)[:, 1:, ::2]
    expanded = torch.randn(1, 2, 14, 10, dtype=dtype, generator=g).expand(3, 2, 14, 10)
    for images in (channels_last, sliced, expanded):
        assert not images.is_contiguous() and not raw.is_contiguous()
        for mode in ("value", "percentile"):
            _check_ladder(backend, raw, images, _ladder(mode), mode, "soft")


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
def test_non_contiguous_thresholds(backend, dtype):
    """Strided thresholds, in the maps' dtype too (which a kernel might read without copying)."""
    g = _generator(14)
    raw = torch.randn(2, 5, 6, dtype=dtype, generator=g)
    images = torch.randn(2, 2, 9, 7, dtype=dtype, generator=g)
    maps = reference.scale_maps(raw, 9, 7)
    for mode in ("value", "percentile"):
        for threshold_dtype in (dtype, torch.float64):
            strided = _ladder(mode, threshold_dtype).repeat_interleave(2)[1::2]
            assert not strided.is_contiguous()
            _check_ladder(backend, raw, images, strided, mode, "soft")
            got = ops.tft_mask(
                *_on(_device(backend), maps, images, strided), mode=mode, backend=backend
            )
            expected = reference.tft_mask(maps, images, strided, mode, "binary")
            assert torch.equal(got.cpu(), expected), (mode, threshold_dtype)


@requires_extension
@DTYPES
def test_the_cpu_op_reads_strided_thresholds_in_the_maps_dtype(dtype):
    """The C++ op itself (not only its front door, which makes thresholds contiguous)."""
    g = _generator(15)
    maps = torch.rand(2, 9, 7, dtype=dtype, generator=g)
    images = torch.randn(2, 2, 9, 7, dtype=dtype, generator=g)
    strided = _ladder("value", dtype).repeat_interleave(2)[1::2]
    got = torch.ops.fastxai.tft_mask(maps, images, strided, "value", "binary")
    assert torch.equal(got, reference.tft_mask(maps, images, strided, "value", "binary"))


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
def test_nan_in_a_raw_map_makes_that_whole_map_nan(backend, dtype):
    """As the reference's amin / amax: Triton's tl.min / tl.max would skip the NaN."""
    g = _generator(11)
    raw = torch.randn(2, 4, 5, dtype=dtype, generator=g)
    raw[0, 1, 2] = float("nan")
    images = torch.randn(2, 3, 8, 9, dtype=dtype, generator=g)
    expected_maps = reference.scale_maps(raw, 8, 9)
    assert expected_maps[0].isnan().all() and not expected_maps[1].isnan().any()
    for mode in ("value", "percentile"):
        thresholds = _ladder(mode)
        raw_d, images_d, thresholds_d = _on(_device(backend), raw, images, thresholds)
        masked, maps = ops.tft_ladder(
            raw_d, images_d, thresholds_d, mode=mode, mask="soft", backend=backend
        )
        maps, masked = maps.cpu(), masked.cpu()
        assert maps[0].isnan().all(), f"{mode}: {int(maps[0].isnan().sum())} of 72 NaN"
        torch.testing.assert_close(maps[1], expected_maps[1], atol=ATOL[dtype], rtol=0)
        expected = reference.tft_mask(maps, images, thresholds, mode, "soft")
        torch.testing.assert_close(masked, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS_AND_REFERENCE)
def test_a_nan_percentile_threshold_mutes_nothing(backend):
    g = _generator(12)
    raw, images = torch.randn(2, 4, 4, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    thresholds = torch.tensor([0.25, float("nan"), 0.5], dtype=torch.float64)
    masked, _ = _check_ladder(backend, raw, images, thresholds, "percentile", "binary")
    assert torch.equal(masked.view(2, 3, 3, 8, 8)[:, 1], images)


@pytest.mark.parametrize("backend", BACKENDS_AND_REFERENCE)
def test_percentile_ties_mute_earlier_pixels_first(backend):
    # A raw map that is negative on its top half: after ReLU and scaling those rows are exactly 0,
    # a tie across many pixels that the pivot falls into.
    raw = torch.randn(2, 6, 6, generator=_generator(5))
    raw[:, :3] = -1.0
    images = torch.randn(2, 3, 16, 16, generator=_generator(6))
    thresholds = torch.tensor([0.1, 0.3, 0.45], dtype=torch.float64)
    _, maps = _check_ladder(backend, raw, images, thresholds, "percentile", "binary")
    assert (maps == 0).sum(dim=(1, 2)).min() > 0.45 * 256, "the tie must hold the pivot"
    keep = _keep_masks(maps, thresholds, "percentile")
    for n in range(2):
        for t, q in enumerate(thresholds.tolist()):
            muted = (~keep[n, t]).flatten().nonzero()[:, 0]
            assert len(muted) == math.floor(q * 256)
            # Every muted pixel is a zero, and they are the first zeros in row-major order.
            zeros = (maps[n].flatten() == 0).nonzero()[:, 0]
            assert torch.equal(muted, zeros[: len(muted)])


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
def test_tft_mask_equals_reference_exactly(backend, dtype):
    g = _generator(21)
    # Quantised maps: many ties, exact zeros, values equal to thresholds.
    maps = (torch.randint(0, 11, (3, 13, 9), generator=g) / 10).to(dtype)
    images = torch.randn(3, 2, 13, 9, dtype=dtype, generator=g)
    device = _device(backend)
    cases = [(maps, images), (maps.transpose(1, 2).contiguous().transpose(1, 2), images[..., :])]
    cases.append((maps[:0], images[:0]))
    with_nan = maps.clone()
    with_nan[0, 3, :4] = float("nan")  # NaN sorts last and is never >= tau
    cases.append((with_nan, images))
    for mode in ("value", "percentile"):
        thresholds = _ladder(mode)
        for mask in ("binary", "soft"):
            for case_maps, case_images in cases:
                got = ops.tft_mask(
                    *_on(device, case_maps, case_images, thresholds),
                    mode=mode,
                    mask=mask,
                    backend=backend,
                ).cpu()
                expected = reference.tft_mask(case_maps, case_images, thresholds, mode, mask)
                assert got.shape == expected.shape
                torch.testing.assert_close(
                    got, expected, atol=0, rtol=0, equal_nan=True, msg=f"{mode} {mask}"
                )


@requires_extension
@DTYPES
def test_cpp_ladder_schedules_agree(dtype):
    # With at least as many images as threads the C++ ladder runs one task per image (map, pivots,
    # rows); with fewer, scale_maps then (image, block) tasks. Both give scale_maps' exact map.
    g = _generator(17)
    raw = torch.randn(3, 6, 5, dtype=dtype, generator=g)
    images = torch.randn(3, 2, 40, 30, dtype=dtype, generator=g)
    threads = torch.get_num_threads()
    try:
        for mode, mask in (("value", "soft"), ("percentile", "binary")):
            results = []
            for num_threads in (1, 8):
                torch.set_num_threads(num_threads)
                results.append(ops.tft_ladder(raw, images, _ladder(mode), mode=mode, mask=mask))
            (per_image, per_image_maps), (by_blocks, by_blocks_maps) = results
            assert torch.equal(per_image, by_blocks) and torch.equal(per_image_maps, by_blocks_maps)
            assert torch.equal(per_image_maps, torch.ops.fastxai.scale_maps(raw, 40, 30))
    finally:
        torch.set_num_threads(threads)


@requires_extension
@DTYPES
def test_large_batches_stream_their_stores(dtype):
    # Over 16 MB the C++ kernel writes with streaming stores (x86 with AVX2), from each row's first
    # 32-byte aligned element: odd widths leave unaligned heads and tails.
    g = _generator(13)
    raw = torch.randn(3, 7, 7, dtype=dtype, generator=g)
    images = torch.randn(3, 3, 211, 301, dtype=dtype, generator=g)
    assert 10 * images.numel() * images.element_size() > 16 * 2**20
    for mode, mask in (("value", "binary"), ("percentile", "soft")):
        masked, maps = ops.tft_ladder(raw, images, _ladder(mode), mode=mode, mask=mask)
        expected = reference.tft_mask(maps, images, _ladder(mode), mode, mask)
        assert torch.equal(masked, expected), (mode, mask)


@pytest.mark.parametrize("backend", BACKENDS_AND_REFERENCE)
def test_out_variant_writes_into_the_buffer(backend):
    g = _generator(8)
    raw = torch.randn(2, 7, 7, generator=g)
    images = torch.randn(2, 3, 20, 18, generator=g)
    thresholds = _ladder("value")
    device = _device(backend)
    out = torch.full((20, 3, 20, 18), float("nan"), device=device)
    pointer = out.data_ptr()
    masked, maps = ops.tft_ladder(*_on(device, raw, images, thresholds), out=out, backend=backend)
    assert masked is out and out.data_ptr() == pointer
    fresh, fresh_maps = ops.tft_ladder(*_on(device, raw, images, thresholds), backend=backend)
    assert torch.equal(out, fresh) and torch.equal(maps, fresh_maps)
    # Reused for a second call with other inputs.
    raw2 = torch.randn(2, 7, 7, generator=g)
    _, maps2 = ops.tft_ladder(
        *_on(device, raw2, images, thresholds), mode="percentile", out=out, backend=backend
    )
    expected, expected_maps2 = ops.tft_ladder(
        *_on(device, raw2, images, thresholds), mode="percentile", backend=backend
    )
    assert torch.equal(out, expected) and torch.equal(maps2, expected_maps2)
    with pytest.raises(RuntimeError, match=r"out must be \(N \* T, C, H, W\)"):
        ops.tft_ladder(*_on(device, raw, images, thresholds), out=out[:10], backend=backend)


@requires_extension
@pytest.mark.parametrize(
    ("op", "args", "message"),
    [
        ("tft_mask", (torch.zeros(2, 4, 4), torch.zeros(2, 3, 4, 4), "otsu", "binary"), "mode"),
        ("tft_mask", (torch.zeros(2, 4, 4), torch.zeros(2, 3, 4, 4), "value", "hard"), "mask"),
        ("tft_mask", (torch.zeros(2, 4, 5), torch.zeros(2, 3, 4, 4), "value", "binary"), "maps"),
        ("tft_mask", (torch.zeros(3, 4, 4), torch.zeros(2, 3, 4, 4), "value", "binary"), "batch"),
        ("tft_mask", (torch.zeros(2, 4, 4), torch.zeros(3, 4, 4), "value", "binary"), "images"),
        (
            "tft_mask",
            (torch.zeros(2, 4, 4, dtype=torch.float64), torch.zeros(2, 3, 4, 4), "value", "soft"),
            "same dtype",
        ),
        ("tft_ladder", (torch.zeros(2, 0, 4), torch.zeros(2, 3, 4, 4), "value", "soft"), "raw"),
        ("tft_ladder", (torch.zeros(2, 4), torch.zeros(2, 3, 4, 4), "value", "soft"), "raw"),
        (
            "tft_ladder",
            (
                torch.zeros(2, 4, 4, dtype=torch.int64),
                torch.zeros(2, 3, 4, 4).long(),
                "value",
                "soft",
            ),
            "Long",
        ),
    ],
)
def test_bad_ladder_input_is_rejected(op, args, message):
    maps, images, mode, mask = args
    thresholds = torch.tensor([0.5])
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.fastxai, op)(maps, images, thresholds, mode, mask)
    with pytest.raises(RuntimeError, match="thresholds must be 1-D"):
        torch.ops.fastxai.tft_mask(
            torch.zeros(1, 2, 2), torch.zeros(1, 1, 2, 2), thresholds[None], "value", "binary"
        )


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_front_door_rejects_bad_options(backend):
    raw, images = torch.zeros(1, 3, 3), torch.zeros(1, 1, 6, 6)
    with pytest.raises(ValueError, match="mode must be"):
        ops.tft_ladder(raw, images, [0.5], mode="otsu", backend=backend)
    with pytest.raises(ValueError, match="mask must be"):
        ops.tft_mask(images[:, 0], images, [0.5], mask="hard", backend=backend)
    with pytest.raises(ValueError, match="backend must be"):
        ops.rpi_select(
            torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), torch.ones(1), backend="numpy"
        )


# ---------------------------------------------------------------------------------------------
# rpi_select
# ---------------------------------------------------------------------------------------------


def _ladder_logits(n: int, t: int, k: int, dtype: torch.dtype, seed: int):
    """Logits of N originals and of their T masked versions, some raising the class score."""
    g = _generator(seed)
    original_logits = torch.randn(n, k, dtype=dtype, generator=g) * 3
    classes = torch.randint(0, k, (n,), generator=g)
    original = torch.softmax(original_logits, 1).gather(1, classes[:, None])[:, 0]
    logits = original_logits.repeat_interleave(t, 0) + torch.randn(
        n * t, k, dtype=dtype, generator=g
    )
    logits[torch.arange(n * t), classes.repeat_interleave(t)] += (
        torch.randn(n * t, dtype=dtype, generator=g) * 2
    )
    return logits, classes, original


def _check_select(backend, logits, classes, original):
    device = _device(backend)
    got = ops.rpi_select(*_on(device, logits, classes, original), backend=backend)
    rpi, index, probability = (t.cpu() for t in got)
    n = classes.shape[0]
    assert rpi.shape == (n, logits.shape[0] // n if n else 0) and rpi.dtype == logits.dtype
    assert probability.shape == rpi.shape and probability.dtype == logits.dtype
    assert index.shape == (n,) and index.dtype == torch.int64
    if backend == "torch":  # the reference itself: the caller's own assertions only
        return rpi, index
    expected_rpi, expected_index, expected_probability = reference.rpi_select(
        logits, classes, original
    )
    # p = softmax(l)_c is in [0, 1]: the kernels' reassociated sums hold it to the dtype's ATOL.
    torch.testing.assert_close(
        probability, expected_probability, atol=ATOL[logits.dtype], rtol=0, equal_nan=True
    )
    tolerance = ATOL[logits.dtype] * (1 + expected_rpi.abs())
    worst = ((rpi - expected_rpi).abs() - tolerance).max().item() if rpi.numel() else -1
    assert worst <= 0, f"rpi beyond tolerance by {worst:.3g}"
    # The index is the reference's unless a near-tie (within tolerance) decides it.
    for i in range(len(index)):
        if index[i] != expected_index[i]:
            best = expected_rpi[i].max()
            chosen = rpi[i, index[i]] if index[i] >= 0 else torch.zeros(())
            assert (best - chosen).abs() <= 2 * tolerance[i].max(), (i, index[i], expected_index[i])
    return rpi, index


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
@pytest.mark.parametrize(
    ("n", "t", "k"),
    [(3, 10, 1000), (1, 1, 5), (4, 7, 33), (2, 9, 1)],
    ids=["imagenet", "T=1", "odd-K", "K=1"],
)
def test_rpi_select_matches_reference(backend, dtype, n, t, k):
    logits, classes, original = _ladder_logits(n, t, k, dtype, seed=n * 100 + t * 10 + k)
    _, index = _check_select(backend, logits, classes, original)
    if n * t >= 10 and k > 1:
        assert (index >= 0).any(), "the inputs should raise some probability"


@pytest.mark.parametrize("backend", BACKENDS_AND_REFERENCE)
@DTYPES
def test_rpi_select_ties_pick_first_and_zero_gives_minus_one(backend, dtype):
    logits, classes, original = _ladder_logits(3, 6, 50, dtype, seed=4)
    best_row = logits[1].clone()
    best_row[classes[0]] += 10  # the largest probability of image 0, at t = 1 and t = 4
    logits[1], logits[4] = best_row, best_row
    original[1] = 1.0  # image 1: no masked probability exceeds 1, every RPI is 0
    logits[12:18] = logits[12]  # image 2: one candidate six times
    rpi, index = _check_select(backend, logits, classes, original)
    assert index[0] == 1 and rpi[0, 1] == rpi[0, 4]
    assert index[1] == -1 and torch.equal(rpi[1], torch.zeros_like(rpi[1]))
    assert index[2] in (-1, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
def test_rpi_select_edge_cases(backend, dtype):
    logits, classes, original = _ladder_logits(3, 5, 40, dtype, seed=9)
    # Non-contiguous views.
    _check_select(backend, logits.t().contiguous().t(), classes, original)
    wide = torch.zeros(30, 80, dtype=dtype)
    wide[::2, ::2] = logits
    _check_select(backend, wide[::2, ::2], torch.stack([classes, classes], 1)[:, 0], original[:])
    # Large logits (most exponentials underflow) and -inf entries.
    scaled = logits * 40
    scaled[:, 3] = float("-inf")
    scaled[torch.arange(15), classes.repeat_interleave(5)] = logits.max() * 40
    _check_select(backend, scaled, classes, original)
    # Empty batch; an empty ladder (T = 0) selects nothing.
    rpi, index = _check_select(backend, logits[:0], classes[:0], original[:0])
    assert rpi.shape == (0, 0) and index.shape == (0,)
    rpi, index = _check_select(backend, logits[:0], classes, original)
    assert rpi.shape == (3, 0) and index.tolist() == [-1, -1, -1]


@pytest.mark.parametrize("backend", BACKENDS_AND_REFERENCE)
def test_a_bad_class_gives_the_same_error_on_every_backend(backend):
    device = _device(backend)
    logits, original = torch.zeros(6, 4, device=device), torch.ones(2, device=device)
    for classes, message in [([0, 5], r"classes\[1\] = 5"), ([-1, 2], r"classes\[0\] = -1")]:
        bad = torch.tensor(classes, device=device)
        with pytest.raises(RuntimeError, match=f"^rpi_select: {message} is out of range for 4"):
            ops.rpi_select(logits, bad, original, backend=backend)


@requires_extension
def test_bad_select_input_is_rejected():
    logits = torch.zeros(6, 4)
    classes = torch.tensor([0, 3])
    original = torch.ones(2)
    cases = [
        ((logits, classes + 2, original), "out of range"),
        ((logits[:5], classes, original), "N \\* T rows"),
        ((logits, classes.int(), original), "int64"),
        ((logits, classes, original.double()), "dtype of logits"),
        ((logits, classes, original[:1]), "original must be"),
        ((logits[0], classes, original), "logits must be"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fastxai.rpi_select(*args)


# ---------------------------------------------------------------------------------------------
# opcheck, compile, CUDA, fallback
# ---------------------------------------------------------------------------------------------


def _ladder_args(dtype=torch.float32, non_contiguous=False):
    g = _generator(2)
    raw = torch.randn(2, 5, 6, dtype=dtype, generator=g)
    images = torch.randn(2, 3, 10, 12, dtype=dtype, generator=g)
    if non_contiguous:
        raw = raw.transpose(1, 2).contiguous().transpose(1, 2)
        images = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return raw, images, torch.tensor([0.0, 0.4, 0.8], dtype=torch.float64)


OPCHECK_CASES = [
    pytest.param(torch.float32, False, "value", "binary", id="f32-value-binary"),
    pytest.param(torch.float64, True, "percentile", "soft", id="f64-percentile-soft-strided"),
]


@requires_extension
@pytest.mark.parametrize(("dtype", "non_contiguous", "mode", "mask"), OPCHECK_CASES)
def test_opcheck_ladder_ops(dtype, non_contiguous, mode, mask):
    raw, images, thresholds = _ladder_args(dtype, non_contiguous)
    torch.library.opcheck(torch.ops.fastxai.tft_ladder, (raw, images, thresholds, mode, mask))
    out = images.new_empty((6, 3, 10, 12))
    torch.library.opcheck(
        torch.ops.fastxai.tft_ladder_out, (raw, images, thresholds, mode, mask, out)
    )
    maps = reference.scale_maps(raw, 10, 12)
    torch.library.opcheck(torch.ops.fastxai.tft_mask, (maps, images, thresholds, mode, mask))
    torch.library.opcheck(
        torch.ops.fastxai.tft_mask, (maps[:0], images[:0], thresholds, mode, mask)
    )


@requires_extension
@DTYPES
def test_opcheck_rpi_select(dtype):
    logits, classes, original = _ladder_logits(3, 4, 20, dtype, seed=1)
    torch.library.opcheck(torch.ops.fastxai.rpi_select, (logits, classes, original))
    torch.library.opcheck(torch.ops.fastxai.rpi_select, (logits[:0], classes[:0], original[:0]))


@requires_extension
@pytest.mark.skipif(not TRITON_ON_CPU, reason="TRITON_INTERPRET is not set")
def test_opcheck_ops_with_their_triton_kernels():
    fastxai = torch.ops.fastxai
    raw, images, thresholds = _ladder_args(non_contiguous=True)
    out = images.new_empty((6, 3, 10, 12))
    maps = torch.rand(2, 10, 12)
    logits, classes, original = _ladder_logits(2, 3, 10, torch.float32, seed=2)
    with triton_as_cpu_kernel("tft_ladder", "tft_ladder_out", "tft_mask", "rpi_select"):
        torch.library.opcheck(fastxai.tft_ladder, (raw, images, thresholds, "percentile", "soft"))
        torch.library.opcheck(
            fastxai.tft_ladder_out, (raw, images, thresholds, "value", "binary", out)
        )
        torch.library.opcheck(fastxai.tft_mask, (maps, images, thresholds, "value", "soft"))
        torch.library.opcheck(fastxai.rpi_select, (logits, classes, original))


def test_compile_fullgraph_ladder():
    def ladder(raw, images, thresholds, out):
        masked, maps = ops.tft_ladder(raw * 2.0, images, thresholds, mode="percentile")
        _, maps_out = ops.tft_ladder(raw, images, thresholds, mask="soft", out=out)
        again = ops.tft_mask(maps_out, images, thresholds)
        return masked.sum((1, 2, 3)), maps, maps_out * 0.5, again + 1

    raw, images, thresholds = _ladder_args()
    out_eager, out_compiled = images.new_empty((6, 3, 10, 12)), images.new_empty((6, 3, 10, 12))
    compiled = torch.compile(ladder, fullgraph=True)
    for got, expected in zip(
        compiled(raw, images, thresholds, out_compiled),
        ladder(raw, images, thresholds, out_eager),
        strict=True,
    ):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out_compiled, out_eager, atol=1e-5, rtol=1e-6)


def test_compile_fullgraph_rpi_select():
    def select(logits, classes, original):
        rpi, index, probability = ops.rpi_select(logits.float(), classes, original)
        return rpi * 2, index.clamp_min(0), probability + 1

    args = _ladder_logits(3, 10, 100, torch.float32, seed=3)
    compiled = torch.compile(select, fullgraph=True)
    for got, expected in zip(compiled(*args), select(*args), strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.skipif(
    not CUDA_KERNELS["tft_ladder"],
    reason="fastxai._C is not loaded or was built without CUDA kernels",
)
@requires_gpu
def test_cuda_kernels_match_reference():
    raw = torch.randn(3, 7, 7, generator=_generator(1))
    images = torch.randn(3, 3, 40, 36, generator=_generator(2))
    for mode in ("value", "percentile"):
        thresholds = _ladder(mode)
        masked, maps = ops.tft_ladder(*_on("cuda", raw, images, thresholds), mode=mode)
        torch.testing.assert_close(maps.cpu(), reference.scale_maps(raw, 40, 36), atol=1e-6, rtol=0)
        expected = reference.tft_mask(maps.cpu(), images, thresholds, mode, "binary")
        assert torch.equal(masked.cpu(), expected)
    logits, classes, original = _ladder_logits(3, 10, 1000, torch.float32, seed=5)
    rpi, index, probability = ops.rpi_select(*_on("cuda", logits, classes, original))
    expected_rpi, expected_index, expected_probability = reference.rpi_select(
        logits, classes, original
    )
    torch.testing.assert_close(rpi.cpu(), expected_rpi, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probability.cpu(), expected_probability, atol=1e-6, rtol=0)
    assert torch.equal(index.cpu(), expected_index)


_FALLBACK_SCRIPT = """
import torch

import fastxai.ops as ops
from fastxai.ops import reference

assert not ops.has_extension(), ops.extension_status()
raw = torch.randn(2, 5, 5)
images = torch.randn(2, 3, 12, 10)
thresholds = torch.tensor([0.0, 0.5])
masked, maps = ops.tft_ladder(raw, images, thresholds)
expected, expected_maps = reference.tft_ladder(raw, images, thresholds)
assert torch.equal(masked, expected) and torch.equal(maps, expected_maps)
logits, classes, original = torch.randn(4, 7), torch.tensor([1, 2]), torch.tensor([0.1, 0.2])
for got, want in zip(ops.rpi_select(logits, classes, original),
                     reference.rpi_select(logits, classes, original)):
    assert torch.equal(got, want)
try:
    ops.tft_mask(maps, images, thresholds, backend="cpp")
except RuntimeError:
    pass
else:
    raise AssertionError("backend='cpp' ran without the extension")
print("fallback ok")
"""


def test_fallback_without_extension():
    result = run_without_extension(_FALLBACK_SCRIPT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fallback ok" in result.stdout
