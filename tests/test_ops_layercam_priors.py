"""``fastxai::layercam`` and ``fastxai::mask_priors``: every backend against the reference.

References (:mod:`fastxai.ops.reference`):
``layercam(g, A) = relu(sum_k relu(g_k) * A_k)`` ``(N, C, h, w) -> (N, h, w)``, and
``mask_priors(p) = [mean p, mean p(1-p), mean |dy p| + mean |dx p| (+ diagonals / sqrt 2)]`` per
sample, ``(N, C, H, W) -> (N, 3)``. Kernels: ``cpp`` (C++ CPU or CUDA kernels) and ``triton``
(under the interpreter when there is no GPU, see conftest.py), each against the reference in
float64. ``mask_priors`` is also checked, on every backend and the reference, against its
definition written as explicit loops over the pixels.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    HAS_GPU,
    TRITON_ON_CPU,
    kernel_backend_params,
    run_without_extension,
    triton_as_cpu_kernel,
)

import fastxai.ops as ops
from fastxai.ops import reference

RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]

requires_extension = pytest.mark.skipif(
    not ops.has_extension(), reason=f"C++ ops not available: {ops.extension_status()}"
)


BACKENDS = kernel_backend_params("layercam")
PRIORS_BACKENDS = kernel_backend_params("mask_priors")
PRIORS_BACKENDS_AND_REFERENCE = kernel_backend_params("mask_priors", reference=True)
# gradcheck and opcheck run the op many times: the interpreter gets tiny inputs.
CPU_DIFFERENTIABLE_BACKENDS = [
    pytest.param("cpp", id="cpp", marks=requires_extension),
    pytest.param("torch", id="torch"),
]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor, what: str):
    """``|actual - expected| <= rtol * scale`` elementwise, ``scale`` the sum of the magnitudes
    the value was computed from (a sum's rounding is relative to that, not to the sum)."""
    assert actual.shape == expected.shape, what
    assert actual.dtype == expected.dtype, what
    if actual.numel() == 0:
        return
    tolerance = RTOL[actual.dtype] * scale.to(actual.device) + torch.finfo(actual.dtype).tiny
    error = (actual - expected.to(actual.device)).abs()
    worst = (error / tolerance).max().item()
    assert worst <= 1, f"{what}: worst error {worst:.3g} x tolerance, max |diff| {error.max():.3g}"


# ----------------------------------------------------------------------------------------------
# layercam

LAYERCAM_SHAPES = [
    pytest.param((2, 5, 7, 9), id="small"),
    pytest.param((3, 70, 33, 35), id="odd-more-than-one-block"),
    pytest.param((1, 1, 1, 1), id="single-element"),
    pytest.param((4, 3, 2, 13), id="flat"),
    pytest.param((2, 0, 3, 3), id="no-channels"),
    pytest.param((0, 4, 5, 6), id="empty-batch"),
]


def _layercam_inputs(shape, dtype, device, seed=0):
    g = torch.randn(shape, dtype=dtype, generator=_generator(seed)).to(device)
    a = torch.randn(shape, dtype=dtype, generator=_generator(seed + 1)).to(device)
    return g, a


def _layercam_scale(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (g.clamp_min(0) * a).abs().sum(1).double()


def _check_layercam_forward(backend, g, a, what):
    out = ops.layercam(g, a, backend=backend)
    expected = reference.layercam(g.cpu().double(), a.cpu().double()).to(g.dtype)
    _assert_close(out.cpu(), expected, _layercam_scale(g.cpu(), a.cpu()), what)
    assert out.is_contiguous()
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LAYERCAM_SHAPES)
@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_layercam_matches_reference(backend, device, shape, dtype):
    g, a = _layercam_inputs(shape, dtype, device, seed=sum(shape))
    _check_layercam_forward(backend, g, a, f"{backend} {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_layercam_non_contiguous(backend, device, dtype):
    g, a = _layercam_inputs((4, 12, 9, 10), dtype, device)
    views = {
        "transposed": (g.transpose(2, 3), a.transpose(2, 3)),
        "channel-slice": (g[:, ::3], a[:, 1::3]),
        "channels-last": (
            g.contiguous(memory_format=torch.channels_last),
            a.contiguous(memory_format=torch.channels_last),
        ),
        "expanded-batch": (g[:1].expand(3, -1, -1, -1), a[1:2].expand(3, -1, -1, -1)),
    }
    for name, (gv, av) in views.items():
        out = _check_layercam_forward(backend, gv, av, f"{backend} {name}")
        torch.testing.assert_close(
            out, ops.layercam(gv.contiguous(), av.contiguous(), backend=backend), msg=name
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_layercam_backward_matches_reference(backend, device, dtype):
    for shape in [(2, 5, 7, 9), (3, 37, 11, 13), (0, 3, 4, 4)]:
        g, a = _layercam_inputs(shape, dtype, device, seed=sum(shape))
        upstream = torch.randn(shape[0], *shape[2:], dtype=dtype, generator=_generator(5))
        upstream = upstream.to(device)
        gi, ai = g.clone().requires_grad_(), a.clone().requires_grad_()
        ops.layercam(gi, ai, backend=backend).backward(upstream)
        gr, ar = g.cpu().double().requires_grad_(), a.cpu().double().requires_grad_()
        reference.layercam(gr, ar).backward(upstream.cpu().double())
        # Each gradient element is one product: relative to its own size.
        _assert_close(gi.grad.cpu(), gr.grad.to(dtype), gr.grad.abs(), f"d/dg {backend} {shape}")
        _assert_close(ai.grad.cpu(), ar.grad.to(dtype), ar.grad.abs(), f"d/dA {backend} {shape}")


def test_layercam_backward_zero_branches_ignore_inf():
    """Where relu blocks the gradient, an infinite factor still gives 0 (as torch.relu)."""
    g = torch.tensor([[[[-1.0]], [[2.0]]]], dtype=torch.float64)
    a = torch.tensor([[[[float("inf")]], [[1.0]]]], dtype=torch.float64)
    expected = None
    for backend in ["torch"] + (["cpp"] if ops.has_extension() else []):
        gi, ai = g.clone().requires_grad_(), a.clone().requires_grad_()
        ops.layercam(gi, ai, backend=backend).sum().backward()
        grads = (gi.grad, ai.grad)
        assert torch.isfinite(gi.grad).all(), backend
        if expected is None:
            expected = grads
        torch.testing.assert_close(grads, expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", CPU_DIFFERENTIABLE_BACKENDS)
def test_layercam_gradcheck(backend):
    g, a = _layercam_inputs((2, 6, 4, 5), torch.float64, "cpu", seed=3)
    torch.autograd.gradcheck(
        lambda gi, ai: ops.layercam(gi, ai, backend=backend),
        (g.requires_grad_(), a.requires_grad_()),
    )


@pytest.mark.skipif(not (TRITON_ON_CPU or HAS_GPU), reason="needs a GPU or TRITON_INTERPRET=1")
def test_layercam_triton_gradcheck():
    device = "cpu" if TRITON_ON_CPU else "cuda"
    g, a = _layercam_inputs((1, 3, 2, 3), torch.float64, device, seed=4)
    torch.autograd.gradcheck(
        lambda gi, ai: ops.layercam(gi, ai, backend="triton"),
        (g.requires_grad_(), a.requires_grad_()),
    )


@requires_extension
@pytest.mark.parametrize(
    "make_inputs",
    [
        lambda: _layercam_inputs((2, 5, 4, 3), torch.float32, "cpu"),
        lambda: _layercam_inputs((3, 4, 5, 2), torch.float64, "cpu"),
        lambda: tuple(
            t.transpose(2, 3) for t in _layercam_inputs((2, 3, 4, 5), torch.float32, "cpu")
        ),
        lambda: _layercam_inputs((0, 3, 4, 4), torch.float32, "cpu"),
    ],
    ids=["f32", "f64", "non-contiguous", "empty-batch"],
)
def test_layercam_opcheck(make_inputs):
    g, a = make_inputs()
    torch.library.opcheck(torch.ops.fastxai.layercam, (g.requires_grad_(), a.requires_grad_()))
    out = torch.ops.fastxai.layercam(g.detach(), a.detach())
    upstream = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.fastxai.layercam_backward, (upstream, g.detach(), a.detach(), out)
    )


@pytest.mark.skipif(not TRITON_ON_CPU, reason="TRITON_INTERPRET is not set")
def test_layercam_triton_opcheck():
    g, a = _layercam_inputs((1, 3, 2, 3), torch.float32, "cpu")
    with triton_as_cpu_kernel("layercam", "layercam_backward"):
        torch.library.opcheck(torch.ops.fastxai.layercam, (g.requires_grad_(), a.requires_grad_()))
        out = torch.ops.fastxai.layercam(g.detach(), a.detach())
        torch.library.opcheck(
            torch.ops.fastxai.layercam_backward, (torch.ones_like(out), g.detach(), a.detach(), out)
        )


@requires_extension
@pytest.mark.parametrize(
    ("gradient", "activation", "message"),
    [
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), r"gradient must be \(N, C, h, w\)"),
        (torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 4, 3), "activation must have the shape"),
        (
            torch.zeros(1, 2, 3, 4),
            torch.zeros(1, 2, 3, 4, dtype=torch.float64),
            "activation must have the dtype",
        ),
        (
            torch.zeros(1, 2, 3, 4, dtype=torch.int64),
            torch.zeros(1, 2, 3, 4, dtype=torch.int64),
            "not implemented for 'Long'",
        ),
    ],
    ids=["rank-3", "shape-mismatch", "dtype-mismatch", "int64"],
)
def test_layercam_bad_input_is_rejected(gradient, activation, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastxai.layercam(gradient, activation)


@requires_extension
def test_layercam_backward_bad_input_is_rejected():
    g, a = _layercam_inputs((2, 3, 4, 5), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"grad_map must be \(N, h, w\)"):
        torch.ops.fastxai.layercam_backward(torch.zeros(2, 5, 4), g, a, torch.zeros(2, 4, 5))


# ----------------------------------------------------------------------------------------------
# mask_priors

MASK_SHAPES = [
    pytest.param((2, 1, 9, 11), id="small"),
    pytest.param((2, 1, 70, 133), id="odd-several-tiles"),
    pytest.param((3, 1, 1, 7), id="single-row"),
    pytest.param((2, 1, 6, 1), id="single-column"),
    pytest.param((2, 1, 1, 1), id="single-pixel"),
    pytest.param((2, 3, 5, 4), id="three-channels"),
    pytest.param((0, 1, 5, 5), id="empty-batch"),
]
NEIGHBOURS = [pytest.param(4, id="tv4"), pytest.param(8, id="tv8")]


def _masks(shape, dtype, device, seed=0):
    return torch.rand(shape, dtype=dtype, generator=_generator(seed)).to(device)


def _mask_priors_scale(p: torch.Tensor, neighbours: int) -> torch.Tensor:
    # Every term is a mean of non-negative values: relative to itself, plus a little for the
    # per-direction means summed into the TV term.
    return reference.mask_priors(p.cpu().double(), neighbours).abs() * 2


def _check_mask_priors_forward(backend, p, neighbours, what):
    out = ops.mask_priors(p, neighbours, backend=backend)
    expected = reference.mask_priors(p.cpu().double(), neighbours).to(p.dtype)
    _assert_close(out.cpu(), expected, _mask_priors_scale(p, neighbours), what)
    return out


@pytest.mark.parametrize("neighbours", NEIGHBOURS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MASK_SHAPES)
@pytest.mark.parametrize(("backend", "device"), PRIORS_BACKENDS)
def test_mask_priors_matches_reference(backend, device, shape, dtype, neighbours):
    p = _masks(shape, dtype, device, seed=sum(shape))
    _check_mask_priors_forward(backend, p, neighbours, f"{backend} {shape}")


def _pairs(shape: tuple[int, int, int], step: tuple[int, int]) -> list:
    """Every pixel pair ``(c, i, j), (c, i + di, j + dj)`` inside a ``(C, H, W)`` sample."""
    channels, height, width = shape
    di, dj = step
    return [
        ((c, i, j), (c, i + di, j + dj))
        for c in range(channels)
        for i in range(height)
        for j in range(width)
        if 0 <= i + di < height and 0 <= j + dj < width
    ]


# The TV directions and their weights: down, right, and with 8 neighbours both diagonals / sqrt 2.
TV_STEPS = {
    4: [((1, 0), 1.0), ((0, 1), 1.0)],
    8: [((1, 0), 1.0), ((0, 1), 1.0), ((1, 1), 2**-0.5), ((1, -1), 2**-0.5)],
}


def _sign(x: float) -> float:
    return (x > 0) - (x < 0)


def _priors_by_loops(sample: list, neighbours: int) -> tuple[list[float], dict]:
    """The docstring's definition of one sample's [area, binarisation, TV], pixel by pixel in
    Python floats, and its gradient: ``{term: {pixel: d term / d pixel}}``."""
    shape = (len(sample), len(sample[0]), len(sample[0][0]))
    pixels = [(c, i, j) for c in range(shape[0]) for i in range(shape[1]) for j in range(shape[2])]

    def value(pixel):
        c, i, j = pixel
        return sample[c][i][j]

    count = len(pixels)
    area = sum(value(x) for x in pixels) / count
    binarisation = sum(value(x) * (1 - value(x)) for x in pixels) / count
    grad = {
        0: {x: 1 / count for x in pixels},
        1: {x: (1 - 2 * value(x)) / count for x in pixels},
        2: dict.fromkeys(pixels, 0.0),
    }
    tv = 0.0
    for step, weight in TV_STEPS[neighbours]:
        pairs = _pairs(shape, step)
        if not pairs:  # no pairs in this direction: it contributes 0
            continue
        tv += weight * sum(abs(value(b) - value(a)) for a, b in pairs) / len(pairs)
        for a, b in pairs:
            slope = weight * _sign(value(b) - value(a)) / len(pairs)
            grad[2][b] += slope
            grad[2][a] -= slope
    return [area, binarisation, tv], grad


@pytest.mark.parametrize("neighbours", NEIGHBOURS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("backend", "device"), PRIORS_BACKENDS_AND_REFERENCE)
def test_mask_priors_matches_the_definition_written_as_loops(backend, device, dtype, neighbours):
    """Terms and gradients against explicit loops over pixels and pixel pairs, on small masks
    with ties (a binary and a constant sample), one row, one column and one pixel."""
    generator = _generator(31)
    cases = [
        torch.rand(2, 2, 5, 6, dtype=dtype, generator=generator),
        (torch.rand(2, 1, 4, 3, dtype=dtype, generator=generator) > 0.5).to(dtype),
        torch.full((1, 1, 3, 4), 0.75, dtype=dtype),
        torch.rand(1, 1, 1, 5, dtype=dtype, generator=generator),
        torch.rand(1, 1, 4, 1, dtype=dtype, generator=generator),
        torch.rand(1, 1, 1, 1, dtype=dtype, generator=generator),
    ]
    for p in cases:
        upstream = torch.randn(p.shape[0], 3, dtype=dtype, generator=generator)
        pi = p.to(device).requires_grad_()
        terms = ops.mask_priors(pi, neighbours, backend=backend)
        terms.backward(upstream.to(device))
        for n, sample in enumerate(p.double().tolist()):
            expected, grad = _priors_by_loops(sample, neighbours)
            got = terms[n].detach().cpu().double()
            want = torch.tensor(expected, dtype=torch.float64)
            # Sums of a few dozen non-negative terms: relative to the term itself.
            tolerance = RTOL[dtype] * want.abs() + 1e-300
            assert ((got - want).abs() <= tolerance).all(), (p.shape, n, got, want)
            expected_grad = torch.zeros(p.shape[1:], dtype=torch.float64)
            for term in range(3):
                for (c, i, j), slope in grad[term].items():
                    expected_grad[c, i, j] += float(upstream[n, term]) * slope
            # Each element sums at most ten terms of size <= 4 |upstream| / pixels.
            scale = 40 * upstream[n].double().abs().sum() / expected_grad.numel()
            torch.testing.assert_close(
                pi.grad[n].cpu().double(),
                expected_grad,
                atol=float(RTOL[dtype] * scale),
                rtol=RTOL[dtype],
            )


@pytest.mark.parametrize("neighbours", NEIGHBOURS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("backend", "device"), PRIORS_BACKENDS)
def test_mask_priors_non_contiguous(backend, device, dtype, neighbours):
    base = _masks((4, 2, 13, 17), dtype, device)
    views = {
        "transposed": base[:, :1].transpose(2, 3),
        "strided": base[::2, 1:, ::2, 1::3],
        "channels-last": base.contiguous(memory_format=torch.channels_last),
        "expanded-batch": base[:1, :1].expand(3, 1, 13, 17),
    }
    for name, p in views.items():
        out = _check_mask_priors_forward(backend, p, neighbours, f"{backend} {name}")
        expected = ops.mask_priors(p.contiguous(), neighbours, backend=backend)
        torch.testing.assert_close(out, expected, msg=name)


@pytest.mark.parametrize("neighbours", NEIGHBOURS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("backend", "device"), PRIORS_BACKENDS_AND_REFERENCE)
def test_mask_priors_identities(backend, device, dtype, neighbours):
    p = _masks((3, 1, 12, 10), dtype, device)
    binary = (p > 0.5).to(dtype)
    constant = torch.full_like(p, 0.3)
    terms = ops.mask_priors(p, neighbours, backend=backend)
    torch.testing.assert_close(terms[:, 0], p.mean((1, 2, 3)), rtol=RTOL[dtype], atol=0)
    zeros = p.new_zeros(p.shape[0])
    assert torch.equal(ops.mask_priors(binary, neighbours, backend=backend)[:, 1], zeros)
    assert torch.equal(ops.mask_priors(constant, neighbours, backend=backend)[:, 2], zeros)


@pytest.mark.parametrize("neighbours", NEIGHBOURS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("backend", "device"), PRIORS_BACKENDS)
def test_mask_priors_backward_matches_reference(backend, device, dtype, neighbours):
    cases = {
        "random": _masks((2, 1, 70, 133), dtype, device, seed=1),
        "three-channels": _masks((2, 3, 5, 4), dtype, device, seed=2),
        "single-row": _masks((2, 1, 1, 9), dtype, device, seed=3),
        # Ties: sign(0) = 0 on both sides.
        "binary": (_masks((2, 1, 9, 8), dtype, device, seed=4) > 0.5).to(dtype),
        "constant": torch.full((2, 1, 6, 7), 0.25, dtype=dtype, device=device),
        "empty-batch": _masks((0, 1, 5, 5), dtype, device),
    }
    for name, p in cases.items():
        upstream = torch.randn(p.shape[0], 3, dtype=dtype, generator=_generator(9)).to(device)
        pi = p.clone().requires_grad_()
        ops.mask_priors(pi, neighbours, backend=backend).backward(upstream)
        pr = p.cpu().double().requires_grad_()
        reference.mask_priors(pr, neighbours).backward(upstream.cpu().double())
        # Each element is a sum of a few terms of size ~|upstream| / count.
        pixels_per_sample = math.prod(p.shape[1:])
        per_sample = 4 * upstream.cpu().double().abs().sum(1) / pixels_per_sample
        scale = per_sample[:, None, None, None] + pr.grad.abs()
        _assert_close(pi.grad.cpu(), pr.grad.to(dtype), scale, f"{backend} {name}")


@pytest.mark.parametrize("neighbours", NEIGHBOURS)
@pytest.mark.parametrize("backend", CPU_DIFFERENTIABLE_BACKENDS)
def test_mask_priors_gradcheck(backend, neighbours):
    # Values a grid step apart plus noise: no two neighbours within gradcheck's eps of each other.
    p = 0.05 + 0.9 * _masks((2, 1, 5, 6), torch.float64, "cpu", seed=6)
    torch.autograd.gradcheck(
        lambda x: ops.mask_priors(x, neighbours, backend=backend), (p.requires_grad_(),)
    )


@pytest.mark.skipif(not (TRITON_ON_CPU or HAS_GPU), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("neighbours", NEIGHBOURS)
def test_mask_priors_triton_gradcheck(neighbours):
    device = "cpu" if TRITON_ON_CPU else "cuda"
    p = 0.05 + 0.9 * _masks((1, 1, 3, 4), torch.float64, device, seed=7)
    torch.autograd.gradcheck(
        lambda x: ops.mask_priors(x, neighbours, backend="triton"), (p.requires_grad_(),)
    )


@requires_extension
@pytest.mark.parametrize("neighbours", [4, 8])
@pytest.mark.parametrize(
    "make_p",
    [
        lambda: _masks((2, 1, 7, 5), torch.float32, "cpu"),
        lambda: _masks((3, 2, 4, 6), torch.float64, "cpu"),
        lambda: _masks((2, 1, 6, 5), torch.float32, "cpu").transpose(2, 3),
        lambda: _masks((0, 1, 4, 4), torch.float32, "cpu"),
    ],
    ids=["f32", "f64", "non-contiguous", "empty-batch"],
)
def test_mask_priors_opcheck(make_p, neighbours):
    p = make_p()
    torch.library.opcheck(torch.ops.fastxai.mask_priors, (p.requires_grad_(), neighbours))
    upstream = torch.randn(p.shape[0], 3, dtype=p.dtype)
    torch.library.opcheck(
        torch.ops.fastxai.mask_priors_backward, (upstream, p.detach(), neighbours)
    )


@pytest.mark.skipif(not TRITON_ON_CPU, reason="TRITON_INTERPRET is not set")
def test_mask_priors_triton_opcheck():
    p = _masks((2, 1, 3, 4), torch.float32, "cpu")
    upstream = torch.randn(2, 3)
    with triton_as_cpu_kernel("mask_priors", "mask_priors_backward"):
        torch.library.opcheck(torch.ops.fastxai.mask_priors, (p.requires_grad_(), 8))
        torch.library.opcheck(torch.ops.fastxai.mask_priors_backward, (upstream, p.detach(), 8))


@requires_extension
@pytest.mark.parametrize(
    ("p", "neighbours", "message"),
    [
        (torch.zeros(2, 4, 4), 4, r"p must be \(N, C, H, W\)"),
        (torch.zeros(2, 1, 0, 4), 4, "p must have at least one pixel"),
        (torch.zeros(2, 1, 4, 4), 6, "neighbours must be 4 or 8"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.int64), 4, "not implemented for 'Long'"),
    ],
    ids=["rank-3", "empty-plane", "neighbours-6", "int64"],
)
def test_mask_priors_bad_input_is_rejected(p, neighbours, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastxai.mask_priors(p, neighbours)


@requires_extension
def test_mask_priors_backward_bad_input_is_rejected():
    with pytest.raises(RuntimeError, match=r"grad_terms must be \(N, 3\)"):
        torch.ops.fastxai.mask_priors_backward(torch.zeros(2, 2), torch.zeros(2, 1, 4, 4), 4)


# ----------------------------------------------------------------------------------------------
# Front door, compile, fallback, the Layer-CAM method


@requires_extension
def test_cpp_results_do_not_depend_on_the_thread_count():
    g, a = _layercam_inputs((1, 64, 28, 28), torch.float32, "cpu")
    p = _masks((3, 1, 150, 70), torch.float32, "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append((ops.layercam(g, a), ops.mask_priors(p, 8)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=0, rtol=0)


def test_layercam_method_raw_map_is_the_fused_op(tv_model, images):
    """``fastxai.layercam(...).raw`` is relu(sum_k relu(g_k) A_k) of the captured layer."""
    import fastxai
    from fastxai.capture import capture_layer

    model, x = tv_model("resnet18"), images(2, 64)
    explanation = fastxai.layercam(model, x, "layer3", [3, 917])
    capture = capture_layer(model, x, "layer3", [3, 917], with_gradient=True)
    expected = reference.layercam(capture.gradient, capture.activation)
    scale = _layercam_scale(capture.gradient, capture.activation)
    _assert_close(explanation.raw, expected, scale, "Layer-CAM raw map")
    smoothed = fastxai.layercam(model, x, "layer3", [3, 917], eigen_smooth=True)
    assert smoothed.raw.shape == explanation.raw.shape


def test_front_door_rejects_unknown_backend():
    g, a = _layercam_inputs((1, 2, 3, 3), torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be"):
        ops.layercam(g, a, backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        ops.mask_priors(g[:, :1], backend="numpy")


@requires_extension
def test_auto_uses_the_cpp_op_also_with_grad(monkeypatch):
    """The C++ ops have a backward, so ``auto`` keeps them when inputs require grad."""

    def fail(*args, **kwargs):
        raise AssertionError("auto fell back to the reference")

    monkeypatch.setattr(reference, "layercam", fail)
    monkeypatch.setattr(reference, "mask_priors", fail)
    g, a = _layercam_inputs((2, 3, 4, 4), torch.float32, "cpu")
    ops.layercam(g.requires_grad_(), a.requires_grad_()).sum().backward()
    p = _masks((2, 1, 4, 4), torch.float64, "cpu").requires_grad_()
    ops.mask_priors(p, 8).sum().backward()
    assert g.grad is not None and p.grad is not None


def test_auto_falls_back_for_other_dtypes():
    g, a = _layercam_inputs((2, 3, 4, 4), torch.bfloat16, "cpu")
    torch.testing.assert_close(ops.layercam(g, a), reference.layercam(g, a))
    p = _masks((2, 1, 4, 4), torch.bfloat16, "cpu")
    torch.testing.assert_close(ops.mask_priors(p), reference.mask_priors(p))


def test_layercam_compile_fullgraph_forward_and_backward():
    def loss_fn(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return (ops.layercam(g * 1.5, a) ** 2).mean()

    g, a = _layercam_inputs((2, 6, 5, 7), torch.float32, "cpu", seed=11)
    grads = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        gi, ai = g.clone().requires_grad_(), a.clone().requires_grad_()
        loss = fn(gi, ai)
        loss.backward()
        grads.append((loss.detach(), gi.grad, ai.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_mask_priors_compile_fullgraph_forward_and_backward():
    weights = torch.tensor([100.0, 1.0, 15.0])

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return (ops.mask_priors(torch.sigmoid(logits), 8) * weights).sum(1).mean()

    logits = torch.randn(3, 1, 12, 10, generator=_generator(12))
    grads = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        x = logits.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


_FALLBACK_SCRIPT = """
import torch

import fastxai.ops as ops
from fastxai.ops import reference

assert not ops.has_extension(), ops.extension_status()
g, a = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
assert torch.equal(ops.layercam(g, a), reference.layercam(g, a))
p = torch.rand(2, 1, 6, 7)
assert torch.equal(ops.mask_priors(p, 8), reference.mask_priors(p, 8))
try:
    ops.mask_priors(p, backend="cpp")
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
