"""Checks of ``layercam`` and ``mask_priors``, forward and backward.

Tolerances, each ``REL`` times a reference quantity:

* ``layercam``: the sum of the magnitudes of the channel terms :math:`|\\mathrm{ReLU}(g_k) A_k|`
  (a sum's rounding is relative to them, not to the sum, which may cancel). Its gradients are
  one product per element: relative to themselves; pixels whose reference map lies within the
  forward tolerance of 0 (and is not exactly 0) may take either side of the ReLU, so their
  gradients are not compared.
* ``mask_priors``: each term is a mean (or a sum of up to four means) of non-negative values for
  masks in ``[0, 1]``: relative to the term itself. Each gradient element sums at most ten terms
  of size at most :math:`4 |u| / \\mathrm{pixels}` (a direction with pairs has at least a quarter
  as many pairs as pixels), ``u`` the upstream gradient: relative to that plus itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import fastxai.ops as ops
from fastxai.ops import reference
from fastxai.selftest._core import (
    REL,
    BenchCase,
    Case,
    Inputs,
    LargeCase,
    OpCheck,
    Verdict,
    close,
    combine,
    generator,
    on,
    shape_of,
)

GIB = 1 << 30
# Past 2**31 input elements: 2049 planes of 1024 x 1024 (the last starts at 2**31).
LARGE_PLANES, LARGE_SIZE = 2049, 1024
NEIGHBOURS = (4, 8)


def _upstream(shape: tuple[int, ...], like: Tensor, seed: int) -> Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=generator(seed)).to(like)


# ----------------------------------------------------------------------------------------------
# layercam


def _layercam_run(backend: str, inputs: Inputs) -> tuple[Tensor, ...]:
    return (ops.layercam(inputs["gradient"], inputs["activation"], backend=backend),)


def _layercam_reference(g: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """The float64 map and the tolerance scale: the sum of the channel terms' magnitudes."""
    g64, a64 = g.detach().cpu().double(), a.detach().cpu().double()
    return reference.layercam(g64, a64), (F.relu(g64) * a64).abs().sum(1)


def _layercam_verify(inputs: Inputs, outputs: tuple[Tensor, ...]) -> Verdict:
    g, a = inputs["gradient"], inputs["activation"]
    expected, scale = _layercam_reference(g, a)
    return close("map", outputs[0], expected, REL[g.dtype] * scale, g.dtype)


def _layercam_backward(backend: str, inputs: Inputs) -> Verdict:
    g, a = inputs["gradient"], inputs["activation"]
    n, _, height, width = g.shape
    upstream = _upstream((n, height, width), g, seed=n + height)
    gi, ai = g.detach().requires_grad_(), a.detach().requires_grad_()
    ops.layercam(gi, ai, backend=backend).backward(upstream)
    g64, a64 = (
        g.detach().cpu().double().requires_grad_(),
        a.detach().cpu().double().requires_grad_(),
    )
    reference.layercam(g64, a64).backward(upstream.cpu().double())
    expected, scale = _layercam_reference(g, a)
    ambiguous = ((expected.abs() <= REL[g.dtype] * scale) & (scale > 0))[:, None]
    either = torch.where(ambiguous, float("inf"), 0.0)
    return combine(
        [
            close(
                "d/dgradient", gi.grad, g64.grad, REL[g.dtype] * g64.grad.abs() + either, g.dtype
            ),
            close(
                "d/dactivation", ai.grad, a64.grad, REL[g.dtype] * a64.grad.abs() + either, g.dtype
            ),
        ]
    )


def _layercam_cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    def case(name: str, g: Tensor, a: Tensor) -> Case:
        g, a = on(device, dtype, g), on(device, dtype, a)
        return Case(name, {"gradient": g, "activation": a}, shape_of(g))

    def pair(shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
        return (
            torch.randn(shape, dtype=torch.float64, generator=generator(seed)),
            torch.randn(shape, dtype=torch.float64, generator=generator(seed + 1)),
        )

    nan_g, nan_a = pair((3, 4, 5, 6), 5)
    nan_g[1, 2, 3, 4] = float("nan")
    nan_a[2, 0, 0, 0] = float("nan")
    tie_g, tie_a = (
        torch.randint(-2, 3, (3, 6, 5, 4), generator=generator(s)).double() for s in (7, 8)
    )
    tie_g[0] = -tie_g[0].abs()  # image 0: every ReLU(g) is 0, the map exactly 0
    base_g, base_a = (on(device, dtype, t) for t in pair((4, 12, 9, 10), 9))
    channels_last = torch.channels_last
    return [
        case("random", *pair((2, 5, 7, 9), 1)),
        case("random odd", *pair((3, 70, 33, 35), 2)),
        case("N=0", *pair((0, 4, 5, 6), 3)),
        case("C=0", *pair((2, 0, 3, 3), 4)),
        case("NaN in g and A", nan_g, nan_a),
        case("ties, a zero map", tie_g, tie_a),
        case("non-contiguous transposed", base_g.transpose(2, 3), base_a.transpose(2, 3)),
        case("non-contiguous channel slice", base_g[:, ::3], base_a[:, 1::3]),
        case(
            "non-contiguous channels-last",
            base_g.contiguous(memory_format=channels_last),
            base_a.contiguous(memory_format=channels_last),
        ),
        case("65537 planes", *pair((65537, 2, 2, 1), 10)),
    ]


def _layercam_take(inputs: Inputs, outputs: tuple[Tensor, ...], samples: list[int]):
    taken = {k: v[samples] for k, v in inputs.items()}
    return taken, (outputs[0][samples],)


def _layercam_large() -> LargeCase:
    shape = (LARGE_PLANES, 1, LARGE_SIZE, LARGE_SIZE)
    return LargeCase(
        f"{shape} float32",
        2 * LARGE_PLANES * LARGE_SIZE * LARGE_SIZE * 4 + GIB,
        lambda device: {
            "gradient": torch.randn(shape, device=device),
            "activation": torch.randn(shape, device=device),
        },
        lambda inputs: [0, LARGE_PLANES - 1],
    )


def _layercam_bench(device: torch.device) -> BenchCase:
    n = 64 if device.type == "cuda" else 8
    shape = (n, 512, 28, 28)
    g, a = torch.randn(shape, device=device), torch.randn(shape, device=device)
    return BenchCase(
        str(shape), {"gradient": g, "activation": a}, 4 * (2 * g.numel() + n * 28 * 28)
    )


LAYERCAM = OpCheck(
    "layercam",
    _layercam_run,
    _layercam_verify,
    _layercam_cases,
    _layercam_take,
    _layercam_large,
    _layercam_bench,
    backward=_layercam_backward,
)


# ----------------------------------------------------------------------------------------------
# mask_priors


def _priors_run(backend: str, inputs: Inputs) -> tuple[Tensor, ...]:
    p = inputs["p"]
    return tuple(
        ops.mask_priors(p, k, backend=backend) for k in inputs.get("neighbours", NEIGHBOURS)
    )


def _priors_verify(inputs: Inputs, outputs: tuple[Tensor, ...]) -> Verdict:
    p = inputs["p"]
    p64 = p.detach().cpu().double()
    verdicts = []
    for k, out in zip(inputs.get("neighbours", NEIGHBOURS), outputs, strict=True):
        expected = reference.mask_priors(p64, k)
        verdicts.append(
            close(f"tv{k} terms", out, expected, REL[p.dtype] * expected.abs(), p.dtype)
        )
    return combine(verdicts)


def _priors_backward(backend: str, inputs: Inputs) -> Verdict:
    p = inputs["p"]
    pixels = max(1, p[0].numel()) if p.shape[0] else 1
    verdicts = []
    for k in inputs.get("neighbours", NEIGHBOURS):
        upstream = _upstream((p.shape[0], 3), p, seed=k)
        pi = p.detach().requires_grad_()
        ops.mask_priors(pi, k, backend=backend).backward(upstream)
        p64 = p.detach().cpu().double().requires_grad_()
        reference.mask_priors(p64, k).backward(upstream.cpu().double())
        per_sample = 40 * upstream.detach().cpu().double().abs().sum(1) / pixels
        scale = per_sample[:, None, None, None] + p64.grad.abs()
        verdicts.append(close(f"tv{k} d/dp", pi.grad, p64.grad, REL[p.dtype] * scale, p.dtype))
    return combine(verdicts)


def _priors_cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    def case(name: str, p: Tensor) -> Case:
        p = on(device, dtype, p)
        return Case(name, {"p": p}, shape_of(p))

    def masks(shape: tuple[int, ...], seed: int) -> Tensor:
        return torch.rand(shape, dtype=torch.float64, generator=generator(seed))

    nan = masks((3, 1, 5, 6), 5)
    nan[1, 0, 2, 2] = float("nan")
    ties = (masks((3, 1, 9, 8), 6) > 0.5).double()  # binary: p (1 - p) = 0, sign(0) in the TV
    ties[2] = 0.25  # constant: TV = 0
    base = on(device, dtype, masks((4, 2, 13, 17), 7))
    return [
        case("random", masks((2, 1, 9, 11), 1)),
        case("random odd", masks((2, 1, 70, 133), 2)),
        case("random three channels", masks((2, 3, 5, 4), 3)),
        case("single row", masks((3, 1, 1, 7), 4)),
        case("single column", masks((2, 1, 6, 1), 4)),
        case("N=0", masks((0, 1, 5, 5), 0)),
        case("NaN in sample 1", nan),
        case("ties, binary and constant", ties),
        case("non-contiguous transposed", base[:, :1].transpose(2, 3)),
        case("non-contiguous strided", base[::2, 1:, ::2, 1::3]),
        case("non-contiguous channels-last", base.contiguous(memory_format=torch.channels_last)),
        case("non-contiguous expanded", base[:1, :1].expand(3, 1, 13, 17)),
        case("65537 planes", masks((65537, 1, 2, 3), 8)),
    ]


def _priors_take(inputs: Inputs, outputs: tuple[Tensor, ...], samples: list[int]):
    return {**inputs, "p": inputs["p"][samples]}, tuple(out[samples] for out in outputs)


def _priors_large() -> LargeCase:
    shape = (LARGE_PLANES, 1, LARGE_SIZE, LARGE_SIZE)
    return LargeCase(
        f"{shape} float32",
        LARGE_PLANES * LARGE_SIZE * LARGE_SIZE * 4 + GIB,
        lambda device: {"p": torch.rand(shape, device=device)},
        lambda inputs: [0, LARGE_PLANES - 1],
    )


def _priors_bench(device: torch.device) -> BenchCase:
    n = 256 if device.type == "cuda" else 32
    p = torch.rand(n, 1, 224, 224, device=device)
    return BenchCase(f"{tuple(p.shape)} tv8", {"p": p, "neighbours": (8,)}, 4 * (p.numel() + 3 * n))


MASK_PRIORS = OpCheck(
    "mask_priors",
    _priors_run,
    _priors_verify,
    _priors_cases,
    _priors_take,
    _priors_large,
    _priors_bench,
    backward=_priors_backward,
)
