"""``fastxai::scale_maps``: every kernel against the reference, opcheck, compile and fallback.

The reference is :func:`fastxai.ops.reference.scale_maps`:
``M = mm(up(mm(relu(raw))))`` with ``mm(z) = (z - min z) / ((max z - min z) + 1e-7)`` per map and
``up`` the bilinear ``F.interpolate(..., align_corners=False)``.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import (
    TRITON_ON_CPU,
    kernel_backend_params,
    run_without_extension,
    triton_as_cpu_kernel,
)

import fastxai.ops as ops
from fastxai.ops import reference

# Max absolute difference to the reference. Both sides round differently (the kernel blends
# columns then rows; ATen's CPU kernel contracts into FMAs or sums four products), and the final
# min-max divides that rounding by the range of the upsampled map.
ATOL = {torch.float32: 1e-6, torch.float64: 1e-12}

requires_extension = pytest.mark.skipif(
    not ops.has_extension(),
    reason=f"C++ op not available: {ops.extension_status()}",
)


def _random_maps(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


BACKENDS = kernel_backend_params("scale_maps")


def _assert_matches_reference(
    raw: torch.Tensor, height: int, width: int, backend: str = "cpp", device: str = "cpu"
) -> torch.Tensor:
    out = ops.scale_maps(raw.to(device), (height, width), backend=backend).cpu()
    expected = reference.scale_maps(raw, height, width)
    assert out.shape == (raw.shape[0], height, width)
    assert out.dtype == raw.dtype
    assert out.is_contiguous()
    atol = ATOL[raw.dtype]
    if out.numel():
        both_nan = out.isnan() & expected.isnan()
        worst = (out - expected).abs().masked_fill(both_nan, 0).max().item()
        assert worst <= atol, (
            f"max |{backend} - reference| = {worst:.3g} > {atol:g} for {tuple(raw.shape)}"
        )
    torch.testing.assert_close(out, expected, atol=atol, rtol=0, equal_nan=True)
    return out


# (N, h, w, H, W). A map whose upsampled version is constant in exact arithmetic while its
# low-resolution version is not (H or h is 1, and W or w is 1) is left out: there the reference
# returns its own rounding noise divided by ~1e-7, which no other implementation reproduces.
SHAPES = [
    pytest.param(2, 7, 7, 64, 64, id="square-up"),
    pytest.param(3, 5, 9, 17, 13, id="odd-nonsquare"),
    pytest.param(2, 30, 40, 7, 11, id="down"),
    pytest.param(2, 6, 40, 23, 9, id="up-rows-down-cols"),
    pytest.param(1, 12, 12, 12, 12, id="same-size"),
    pytest.param(2, 3, 8, 3, 20, id="cols-only"),
    pytest.param(3, 1, 6, 4, 15, id="single-row"),
    pytest.param(4, 1, 1, 9, 5, id="h=w=1"),
    pytest.param(40, 7, 7, 24, 24, id="many-maps"),
    # One large map: its rows are split across threads (when there are at least two).
    pytest.param(1, 9, 13, 320, 288, id="large-single-map"),
]


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("n", "h", "w", "height", "width"), SHAPES)
def test_matches_reference(n, h, w, height, width, dtype, backend, device):
    raw = _random_maps((n, h, w), dtype, seed=n * 1000 + h * 100 + w)
    out = _assert_matches_reference(raw, height, width, backend, device)
    if h * w > 1:
        # Each map spans [0, 1): min-max maps its minimum to 0 and its maximum just below 1.
        flat = out.flatten(1)
        assert torch.all(flat.amin(1) == 0)
        assert torch.all((flat.amax(1) > 0.99) & (flat.amax(1) < 1))


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_random_shapes_match_reference(dtype, backend, device):
    generator = torch.Generator().manual_seed(7)
    for _ in range(30):
        n, h, w, height, width = (int(v) for v in torch.randint(2, 40, (5,), generator=generator))
        raw = torch.randn(n % 4 + 1, h, w, dtype=dtype, generator=generator)
        _assert_matches_reference(raw, height, width, backend, device)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_constant_and_negative_maps_give_zeros(dtype, backend, device):
    constant = torch.full((2, 5, 6), 3.25, dtype=dtype)
    negative = -1 - _random_maps((2, 5, 6), dtype).abs()
    for raw in (constant, negative):
        out = _assert_matches_reference(raw, 13, 11, backend, device)
        assert torch.equal(out, torch.zeros_like(out))


@requires_extension
def test_maps_are_scaled_independently():
    raw = _random_maps((3, 6, 5), torch.float32)
    raw[1] = -2.0  # one all-negative map among live ones
    out = _assert_matches_reference(raw, 14, 10)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(
        out[2:], torch.ops.fastxai.scale_maps(raw[2:], 14, 10), atol=0, rtol=0
    )


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_non_contiguous_inputs(dtype, backend, device):
    base = _random_maps((6, 9, 12), dtype)
    views = {
        "transposed": base.transpose(1, 2),
        "strided-slice": base[::2, 1::2, ::3],
        "permuted": base.permute(2, 0, 1)[:, :7],
        "expanded": base[:1].expand(3, 9, 12),
    }
    for name, raw in views.items():
        assert not raw.is_contiguous(), name
        out = _assert_matches_reference(raw, 19, 17, backend, device)
        contiguous = ops.scale_maps(raw.contiguous().to(device), (19, 17), backend=backend)
        torch.testing.assert_close(out, contiguous.cpu(), atol=0, rtol=0, msg=name)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_empty_batch(dtype, backend, device):
    out = _assert_matches_reference(torch.empty(0, 7, 7, dtype=dtype), 32, 24, backend, device)
    assert out.shape == (0, 32, 24)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_nan_spreads_over_its_map_like_the_reference(backend, device):
    raw = _random_maps((2, 4, 5), torch.float32)
    raw[0, 1, 2] = float("nan")
    out = _assert_matches_reference(raw, 9, 8, backend, device)
    assert torch.isnan(out[0]).all()
    assert not torch.isnan(out[1]).any()


@requires_extension
@pytest.mark.parametrize(
    ("raw", "height", "width", "message"),
    [
        (torch.zeros(4, 4), 8, 8, r"raw must be \(N, h, w\)"),
        (torch.zeros(1, 1, 4, 4), 8, 8, r"raw must be \(N, h, w\)"),
        (torch.zeros(1, 4, 4), 0, 8, "height must be positive"),
        (torch.zeros(1, 4, 4), 8, -3, "width must be positive"),
        (torch.zeros(1, 0, 4), 8, 8, "raw maps must be non-empty"),
        (torch.zeros(1, 4, 4, dtype=torch.int64), 8, 8, "not implemented for 'Long'"),
    ],
    ids=["rank-2", "rank-4", "height-0", "width-negative", "empty-map", "int64"],
)
def test_bad_input_is_rejected(raw, height, width, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastxai.scale_maps(raw, height, width)


@requires_extension
@pytest.mark.parametrize(
    "raw",
    [
        _random_maps((3, 7, 5), torch.float32),
        _random_maps((2, 4, 9), torch.float64),
        _random_maps((4, 8, 6), torch.float32).transpose(1, 2),
        torch.empty(0, 7, 7),
    ],
    ids=["f32", "f64", "non-contiguous", "empty-batch"],
)
def test_opcheck(raw):
    torch.library.opcheck(torch.ops.fastxai.scale_maps, (raw, 21, 18))


@requires_extension
@pytest.mark.skipif(not TRITON_ON_CPU, reason="TRITON_INTERPRET is not set")
def test_opcheck_with_the_triton_kernel():
    raw = _random_maps((4, 8, 6), torch.float32).transpose(1, 2)
    with triton_as_cpu_kernel("scale_maps"):
        torch.library.opcheck(torch.ops.fastxai.scale_maps, (raw, 21, 18))


@requires_extension
def test_front_door_backends():
    raw = _random_maps((2, 7, 7), torch.float32)
    cpp = torch.ops.fastxai.scale_maps(raw, 30, 20)
    assert torch.equal(ops.scale_maps(raw, (30, 20)), cpp)
    assert torch.equal(ops.scale_maps(raw, (30, 20), backend="cpp"), cpp)
    assert torch.equal(
        ops.scale_maps(raw, (30, 20), backend="torch"), reference.scale_maps(raw, 30, 20)
    )


def test_compile_fullgraph():
    def explain(raw: torch.Tensor) -> torch.Tensor:
        return ops.scale_maps(raw * 2.0 - 0.5, (40, 36)) * 0.5

    raw = _random_maps((3, 7, 7), torch.float32)
    compiled = torch.compile(explain, fullgraph=True)
    torch.testing.assert_close(compiled(raw), explain(raw), atol=ATOL[torch.float32], rtol=0)


def test_extension_is_loaded_in_the_normal_build():
    if os.environ.get("FASTXAI_DISABLE_EXT") == "1":
        pytest.skip("FASTXAI_DISABLE_EXT=1 is set for this test run")
    assert ops.has_extension(), (
        f"{ops.extension_status()}; build it with `python setup.py build_ext --inplace`"
    )


_FALLBACK_SCRIPT = """
import sys

import torch

import fastxai.ops as ops
from fastxai.ops import reference

assert not ops.has_extension(), ops.extension_status()
assert ops.extension_status() == (
    "fastxai._C not loaded (disabled by FASTXAI_DISABLE_EXT=1): "
    "every op runs the PyTorch reference"
), ops.extension_status()
assert "fastxai._C" not in sys.modules, "fastxai._C was imported although disabled"
raw = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
assert torch.equal(ops.scale_maps(raw, (19, 23)), reference.scale_maps(raw, 19, 23))
try:
    ops.scale_maps(raw, (19, 23), backend="cpp")
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
