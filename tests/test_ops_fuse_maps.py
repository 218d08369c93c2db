"""``fastxai::fuse_maps``: every kernel against the reference, opcheck, compile and fallback.

Tests whose assertions do not go through the reference (the min-max's range, NaN spreading over
its image, dead layers) also run the reference itself.

The reference is :func:`fastxai.ops.reference.fuse_maps`, for raw maps ``r_l`` of L layers:
``"mean"``: ``mm((1/L) sum_l relu(up(mm(relu(r_l)))))``; ``"tanh"``:
``mm(max_l tanh(2 M_l / max(max M_l, 1e-7)))`` with ``M_l = mm(up(mm(relu(r_l))))``, ``mm`` the
per-map min-max with eps 1e-7 and ``up`` the bilinear ``F.interpolate(align_corners=False)``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    TRITON_ON_CPU,
    kernel_backend_params,
    run_without_extension,
    triton_as_cpu_kernel,
)

import fastxai
import fastxai.ops as ops
from fastxai.ops import reference

# Max absolute difference to the reference in the same dtype. The kernels round the bilinear blends
# in another order than ATen, and the final min-max divides that rounding by the fused map's range
# (measured: 2.4e-7 and 3e-15 over 200 random shapes; 2e-6 and 4e-15 against a float64 reference).
ATOL = {torch.float32: 1e-6, torch.float64: 1e-12}
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
FUSIONS = ["mean", "tanh"]

HAS_CPP_OP = ops.has_extension() and hasattr(torch.ops.fastxai, "fuse_maps")
requires_cpp_op = pytest.mark.skipif(
    not HAS_CPP_OP, reason=f"C++ fuse_maps not available: {ops.extension_status()}"
)


BACKENDS = kernel_backend_params("fuse_maps")
BACKENDS_AND_REFERENCE = kernel_backend_params("fuse_maps", reference=True)


def _raws(
    n: int, sizes: list[tuple[int, int]], dtype: torch.dtype, device: str = "cpu", seed: int = 0
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, w, dtype=dtype, generator=generator).to(device) for h, w in sizes]


def _check(
    backend: str, raws: list[torch.Tensor], height: int, width: int, fusion: str
) -> torch.Tensor:
    """The backend's output, and a kernel's against the reference on the CPU in the same dtype
    (the reference, ``backend="torch"``, is left to the caller's own assertions)."""
    out = ops.fuse_maps(raws, (height, width), fusion, backend=backend)
    dtype = raws[0].dtype
    assert out.shape == (raws[0].shape[0], height, width)
    assert out.dtype == dtype
    assert out.device == raws[0].device
    assert out.is_contiguous()
    if backend != "torch":
        expected = reference.fuse_maps([r.cpu() for r in raws], height, width, fusion)
        torch.testing.assert_close(out.cpu(), expected, atol=ATOL[dtype], rtol=0, equal_nan=True)
    return out


# (N, layer sizes (h, w), H, W)
SHAPES = [
    pytest.param(2, [(7, 7), (4, 4), (2, 2)], 32, 32, id="three-layers-up"),
    pytest.param(3, [(5, 9), (3, 4), (6, 2)], 17, 13, id="odd-nonsquare"),
    pytest.param(2, [(30, 40), (6, 5)], 7, 11, id="down-and-up"),
    pytest.param(1, [(12, 12), (6, 6)], 12, 12, id="one-layer-at-output-size"),
    pytest.param(2, [(5, 6)], 13, 11, id="single-layer"),
    pytest.param(2, [(1, 1), (4, 3)], 9, 5, id="1x1-layer"),
    pytest.param(20, [(7, 7), (3, 3)], 24, 24, id="many-maps"),
    # One large image: the C++ kernel splits its rows across threads (when there are two), the
    # Triton kernel merges the ranges of two blocks.
    pytest.param(1, [(9, 13), (5, 7), (3, 3)], 320, 288, id="large-single-map"),
]


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "sizes", "height", "width"), SHAPES)
@pytest.mark.parametrize(("backend", "device"), BACKENDS_AND_REFERENCE)
def test_matches_reference(backend, device, n, sizes, height, width, dtype, fusion):
    raws = _raws(n, sizes, dtype, device, seed=n * 100 + len(sizes))
    out = _check(backend, raws, height, width, fusion).cpu()
    # min-max: each image's minimum becomes 0 and its maximum lands just below 1.
    flat = out.flatten(1)
    assert torch.all(flat.amin(1) == 0)
    assert torch.all((flat.amax(1) > 0.99) & (flat.amax(1) < 1))


@requires_cpp_op
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_shapes_match_reference(dtype, fusion):
    generator = torch.Generator().manual_seed(7)
    for _ in range(20):
        layers = int(torch.randint(1, 5, (1,), generator=generator))
        sizes = [tuple(int(v) for v in torch.randint(2, 30, (2,), generator=generator))]
        sizes += [
            tuple(int(v) for v in torch.randint(1, 30, (2,), generator=generator))
            for _ in range(layers - 1)
        ]
        height, width = (int(v) for v in torch.randint(2, 60, (2,), generator=generator))
        n = int(torch.randint(1, 5, (1,), generator=generator))
        raws = [torch.randn(n, h, w, dtype=dtype, generator=generator) for h, w in sizes]
        _check("cpp", raws, height, width, fusion)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_non_contiguous_inputs(backend, device, dtype, fusion):
    first, second = _raws(6, [(9, 12), (8, 10)], dtype, device)
    views = {
        "transposed": [first.transpose(1, 2), second],
        "strided-slices": [first[::2, 1::2, ::3], second[1::2, ::2]],
        "permuted": [first.permute(2, 0, 1)[:6], second.permute(1, 0, 2)[:6]],
        "expanded": [first[:1].expand(3, 9, 12), second[:3, 2:, 1:]],
    }
    for name, raws in views.items():
        assert not raws[0].is_contiguous(), name
        out = _check(backend, raws, 19, 17, fusion)
        contiguous = [r.contiguous() for r in raws]
        torch.testing.assert_close(
            out,
            ops.fuse_maps(contiguous, (19, 17), fusion, backend=backend),
            atol=0,
            rtol=0,
            msg=name,
        )


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize(("backend", "device"), BACKENDS_AND_REFERENCE)
def test_empty_batch(backend, device, fusion):
    raws = [torch.empty(0, 7, 7, device=device), torch.empty(0, 3, 5, device=device)]
    out = ops.fuse_maps(raws, (32, 24), fusion, backend=backend)
    assert out.shape == (0, 32, 24)
    assert out.dtype == torch.float32


# The interpreter's NumPy reductions warn about the NaN the kernel then handles.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize(("backend", "device"), BACKENDS_AND_REFERENCE)
def test_nan_spreads_over_its_image_like_the_reference(backend, device, fusion):
    raws = _raws(3, [(4, 5), (6, 3)], torch.float32)
    raws[1][0, 2, 1] = float("nan")  # image 0, second layer
    raws[0][2, 0, 0] = float("nan")  # image 2, first layer
    out = _check(backend, [r.to(device) for r in raws], 9, 8, fusion).cpu()
    assert torch.isnan(out[0]).all()
    assert torch.isnan(out[2]).all()
    assert not torch.isnan(out[1]).any()


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize(("backend", "device"), BACKENDS_AND_REFERENCE)
def test_dead_layers_and_images(backend, device, fusion):
    """A constant or all-negative layer scales to 0; an image whose layers are all dead is 0."""
    raws = _raws(3, [(5, 6), (4, 4)], torch.float64)
    raws[0][0] = 3.25  # image 0: first layer constant
    raws[1][0] = -1.0 - raws[1][0].abs()  # ... and second layer negative: all zeros
    raws[1][1] = -2.0  # image 1: only the first layer is alive
    out = _check(backend, [r.to(device) for r in raws], 13, 11, fusion).cpu()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    # One live layer: the mean halves it and min-max restores it (up to the eps, which then
    # weighs twice: 1e-7 relative); tanh is monotone, so the ordering of pixels is that layer's.
    single = reference.scale_maps(raws[0][1:2], 13, 11)[0]
    if fusion == "mean":
        torch.testing.assert_close(out[1], single, atol=1e-6, rtol=0)
    else:
        assert torch.equal(
            out[1].flatten().argsort(stable=True), single.flatten().argsort(stable=True)
        )


@requires_cpp_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_formulas_on_special_inputs(dtype):
    """Identities that do not go through the reference: L equal layers fuse by the mean to the
    layer's scale_maps, and tanh of one layer is mm(tanh(2 M / max M))."""
    (raw,) = _raws(3, [(6, 7)], dtype, seed=3)
    scaled = ops.scale_maps(raw, (23, 19), backend="torch")
    mean = ops.fuse_maps([raw, raw, raw], (23, 19), "mean", backend="cpp")
    torch.testing.assert_close(mean, scaled, atol=ATOL[dtype], rtol=0)
    tanh = ops.fuse_maps([raw], (23, 19), "tanh", backend="cpp")
    expected = torch.tanh(2 * scaled / scaled.flatten(1).amax(1)[:, None, None])
    torch.testing.assert_close(tanh, reference.minmax(expected), atol=ATOL[dtype], rtol=0)


@requires_cpp_op
def test_cpp_results_do_not_depend_on_the_thread_count():
    raws_one = _raws(1, [(9, 13), (5, 7)], torch.float32, seed=4)
    raws_many = _raws(5, [(9, 13), (5, 7)], torch.float32, seed=5)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(
                [
                    ops.fuse_maps(raws, (330, 300), fusion, backend="cpp")
                    for raws in (raws_one, raws_many)
                    for fusion in FUSIONS
                ]
            )
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=0, rtol=0)


@requires_cpp_op
@pytest.mark.parametrize(
    ("raws", "height", "width", "fusion", "message"),
    [
        # The dispatcher rejects an empty list before any kernel: no tensor to pick one by.
        ([], 8, 8, "mean", "empty list of Tensors"),
        ([torch.zeros(4, 4)], 8, 8, "mean", r"raws\[0\] must be \(N, h, w\)"),
        ([torch.zeros(1, 4, 4), torch.zeros(2, 4, 4)], 8, 8, "mean", "batch size of raws"),
        ([torch.zeros(1, 4, 4), torch.zeros(1, 0, 4)], 8, 8, "tanh", "maps must be non-empty"),
        ([torch.zeros(1, 4, 4), torch.zeros(1, 4, 4).double()], 8, 8, "mean", "dtype of raws"),
        ([torch.zeros(1, 4, 4)], 0, 8, "mean", "height must be positive"),
        ([torch.zeros(1, 4, 4)], 8, -1, "mean", "width must be positive"),
        ([torch.zeros(1, 4, 4)], 8, 8, "max", "fusion must be 'mean' or 'tanh'"),
        ([torch.zeros(1, 4, 4, dtype=torch.int64)], 8, 8, "mean", "not implemented for 'Long'"),
    ],
    ids=[
        "no-layers",
        "rank-2",
        "batch-mismatch",
        "empty-map",
        "dtype-mismatch",
        "height-0",
        "width-negative",
        "unknown-fusion",
        "int64",
    ],
)
def test_bad_input_is_rejected(raws, height, width, fusion, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastxai.fuse_maps(raws, height, width, fusion)


def test_front_door_rejects_bad_arguments():
    raws = _raws(1, [(4, 4)], torch.float32)
    with pytest.raises(ValueError, match="fusion must be 'mean' or 'tanh'"):
        ops.fuse_maps(raws, (8, 8), "max")
    with pytest.raises(ValueError, match="at least one map"):
        ops.fuse_maps([], (8, 8))
    with pytest.raises(ValueError, match="backend must be"):
        ops.fuse_maps(raws, (8, 8), backend="numpy")


@requires_cpp_op
@pytest.mark.parametrize(
    ("raws", "fusion"),
    [
        (_raws(3, [(7, 5), (3, 4)], torch.float32), "mean"),
        (_raws(2, [(4, 9), (2, 2), (5, 5)], torch.float64), "tanh"),
        ([r.transpose(1, 2) for r in _raws(4, [(8, 6), (3, 5)], torch.float32)], "mean"),
        ([torch.empty(0, 7, 7), torch.empty(0, 2, 3)], "tanh"),
    ],
    ids=["f32-mean", "f64-tanh", "non-contiguous", "empty-batch"],
)
def test_opcheck(raws, fusion):
    torch.library.opcheck(torch.ops.fastxai.fuse_maps, (raws, 21, 18, fusion))


@pytest.mark.skipif(not TRITON_ON_CPU, reason="TRITON_INTERPRET is not set")
def test_triton_opcheck():
    raws = _raws(1, [(4, 3), (2, 2)], torch.float32)
    with triton_as_cpu_kernel("fuse_maps"):
        torch.library.opcheck(torch.ops.fastxai.fuse_maps, (raws, 6, 5, "tanh"))


@requires_cpp_op
def test_auto_uses_the_kernel_without_grad_and_the_reference_with_grad(monkeypatch):
    raws = _raws(2, [(6, 6), (3, 3)], torch.float32)
    expected = ops.fuse_maps(raws, (20, 20), "mean", backend="cpp")

    def fail(*args, **kwargs):
        raise AssertionError("auto fell back to the reference")

    with monkeypatch.context() as patch:
        patch.setattr(reference, "fuse_maps", fail)
        assert torch.equal(ops.fuse_maps(raws, (20, 20)), expected)
    leaves = [r.clone().requires_grad_() for r in raws]
    fused = ops.fuse_maps(leaves, (20, 20))
    assert fused.requires_grad
    fused.sum().backward()
    assert all(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves)
    torch.testing.assert_close(fused.detach(), expected, atol=ATOL[torch.float32], rtol=0)


def test_auto_falls_back_for_other_dtypes():
    raws = _raws(2, [(6, 6), (3, 3)], torch.bfloat16)
    torch.testing.assert_close(
        ops.fuse_maps(raws, (12, 12), "tanh"), reference.fuse_maps(raws, 12, 12, "tanh")
    )


def test_compile_fullgraph():
    def explain(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return ops.fuse_maps([first * 2.0 - 0.5, second], (40, 36), "mean") * 0.5

    first, second = _raws(3, [(7, 7), (4, 5)], torch.float32)
    compiled = torch.compile(explain, fullgraph=True)
    torch.testing.assert_close(
        compiled(first, second), explain(first, second), atol=ATOL[torch.float32], rtol=0
    )


@pytest.mark.parametrize("fusion", FUSIONS)
def test_layercam_multi_layer_maps_are_the_fused_op(tv_model, images, fusion):
    """The CAM pipeline fuses several layers with this op (``fuse_layer_maps``)."""
    model, x = tv_model("resnet18"), images(2, 64)
    explanation = fastxai.layercam(model, x, ["layer2", "layer3", "layer4"], fusion=fusion)
    raws = explanation.extras["raw_per_layer"]
    assert [tuple(r.shape[1:]) for r in raws] == [(8, 8), (4, 4), (2, 2)]
    expected = reference.fuse_maps(raws, 64, 64, fusion)
    torch.testing.assert_close(explanation.maps, expected, atol=ATOL[torch.float32], rtol=0)


_FALLBACK_SCRIPT = """
import torch

import fastxai.ops as ops
from fastxai.ops import reference

assert not ops.has_extension(), ops.extension_status()
raws = [torch.randn(2, 5, 6), torch.randn(2, 3, 3)]
for fusion in ("mean", "tanh"):
    expected = reference.fuse_maps(raws, 16, 12, fusion)
    assert torch.equal(ops.fuse_maps(raws, (16, 12), fusion), expected)
try:
    ops.fuse_maps(raws, (16, 12), backend="cpp")
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
