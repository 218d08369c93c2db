"""What every op's check shares: the tolerances, the comparison and the shape of a check.

A kernel's output is compared with :mod:`fastxai.ops.reference` evaluated in float64 on the CPU
from the same inputs (upcast exactly), so the reference's own float32 rounding is not in the
comparison. NaN must appear exactly where the reference has NaN; every other element must be
within a tolerance that each op states from reference quantities (never from the kernel's output).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# Rounding a kernel may add per unit of the magnitudes an element is computed from: about 84
# units in the last place of float32 (1.2e-7) and 4500 of float64 (2.2e-16), room for a few
# dozen rounded operations evaluated in another order (reassociated sums, fused multiply-adds).
REL = {torch.float32: 1e-5, torch.float64: 1e-12}
DTYPES = (torch.float32, torch.float64)

Inputs = dict[str, Any]


@dataclass(frozen=True)
class Verdict:
    """One comparison: ``worst`` is the largest ``|kernel - reference| / tolerance`` (0 when
    exact), ``detail`` says where a mismatch is."""

    passed: bool
    worst: float = 0.0
    detail: str = ""


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """All of ``verdicts`` must pass; the first failure's detail, else the worst ratio."""
    for verdict in verdicts:
        if not verdict.passed:
            return verdict
    worst = max((v.worst for v in verdicts), default=0.0)
    return Verdict(True, worst, f"worst {worst:.2g} x tolerance")


def _header(what: str, actual: Tensor, expected: Tensor, dtype: torch.dtype) -> Verdict | None:
    if tuple(actual.shape) != tuple(expected.shape):
        shapes = f"{tuple(actual.shape)}, reference {tuple(expected.shape)}"
        return Verdict(False, float("inf"), f"{what}: shape {shapes}")
    if actual.dtype != dtype:
        return Verdict(False, float("inf"), f"{what}: dtype {actual.dtype}, expected {dtype}")
    return None


def _nan_mismatch(what: str, actual: Tensor, expected: Tensor) -> Verdict | None:
    nan_actual, nan_expected = actual.isnan(), expected.isnan()
    if torch.equal(nan_actual, nan_expected):
        return None
    extra = int((nan_actual & ~nan_expected).sum())
    missing = int((nan_expected & ~nan_actual).sum())
    return Verdict(
        False,
        float("inf"),
        f"{what}: NaN at {extra} elements where the reference has none, "
        f"a number at {missing} where the reference has NaN",
    )


def close(
    what: str, actual: Tensor, expected: Tensor, tolerance: Tensor | float, dtype: torch.dtype
) -> Verdict:
    """``|actual - expected| <= tolerance`` elementwise (``tolerance`` broadcast to ``expected``),
    NaN where and only where ``expected`` is NaN, infinities equal."""
    actual = actual.detach().cpu()
    bad = _header(what, actual, expected, dtype)
    if bad is not None or actual.numel() == 0:
        return bad or Verdict(True)
    actual, expected = actual.double(), expected.double()
    bad = _nan_mismatch(what, actual, expected)
    if bad is not None:
        return bad
    allowed = torch.as_tensor(tolerance, dtype=torch.float64).expand_as(expected)
    allowed = allowed + torch.finfo(dtype).tiny
    error = torch.where(actual == expected, 0.0, (actual - expected).abs())
    ratio = (error / allowed).nan_to_num(nan=0.0, posinf=float("inf"))
    worst = float(ratio.max())
    if worst <= 1:
        return Verdict(True, worst)
    at = int(ratio.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(at), ratio.shape))
    return Verdict(
        False,
        worst,
        f"{what}: {int((ratio > 1).sum())} elements beyond tolerance, worst at {index}: "
        f"{actual.flatten()[at].item():.9g} vs reference {expected.flatten()[at].item():.9g} "
        f"(tolerance {allowed.flatten()[at].item():.3g})",
    )


def exact(what: str, actual: Tensor, expected: Tensor) -> Verdict:
    """Bit-for-bit equal values (NaN where ``expected`` has NaN) in ``expected``'s dtype."""
    actual = actual.detach().cpu()
    bad = _header(what, actual, expected, expected.dtype)
    if bad is not None or actual.numel() == 0:
        return bad or Verdict(True)
    bad = _nan_mismatch(what, actual, expected)
    if bad is not None:
        return bad
    differs = (actual != expected) & ~expected.isnan()
    if not differs.any():
        return Verdict(True)
    at = int(differs.flatten().nonzero()[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(at), differs.shape))
    return Verdict(
        False,
        float("inf"),
        f"{what}: {int(differs.sum())} elements differ (exact op), first at {index}: "
        f"{actual.flatten()[at].item():.9g} vs reference {expected.flatten()[at].item():.9g}",
    )


def minmax_gain(z: Tensor) -> Tensor:
    r"""Per map of ``z`` ``(N, H, W)``: how much a final min-max magnifies an absolute error of
    ``z``, :math:`1 + 1 / (\max z - \min z)` (1 for a constant or NaN map, which the min-max
    sends to exactly 0 or NaN)."""
    if z.shape[0] == 0:
        return z.new_ones(0)
    flat = z.flatten(1)
    spread = flat.amax(1) - flat.amin(1)
    gain = 1 + 1 / spread
    return torch.where((spread > 0) & spread.isfinite(), gain, torch.ones_like(gain))


def on(device: torch.device, dtype: torch.dtype, tensor: Tensor) -> Tensor:
    return tensor.to(device=device, dtype=dtype)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shape_of(*tensors: Tensor) -> str:
    return " ".join(str(tuple(t.shape)) for t in tensors)


@dataclass(frozen=True)
class Case:
    """One input of a check: ``name`` (random, N=0, NaN, ties, ...) and the op's arguments."""

    name: str
    inputs: Inputs
    shape: str


@dataclass(frozen=True)
class LargeCase:
    """Inputs whose elements run past index 2**31 on a GPU; only ``samples`` (the first and the
    last, which lies past 2**31) are compared, the op being independent per sample."""

    shape: str
    bytes_needed: int
    build: Callable[[torch.device], Inputs]
    samples: Callable[[Inputs], list[int]]


@dataclass(frozen=True)
class BenchCase:
    """A benchmark input and the bytes the op must read and write on it."""

    shape: str
    inputs: Inputs
    bytes_moved: int


@dataclass(frozen=True)
class OpCheck:
    """How to check one fused op.

    ``run(backend, inputs)`` calls the front door and returns its outputs; ``verify(inputs,
    outputs)`` compares them with the reference; ``take(inputs, outputs, samples)`` keeps the
    given samples of both (for the past-2**31 case); ``backward(backend, inputs)`` compares
    gradients with the reference's autograd (ops with a backward only).
    """

    op: str
    run: Callable[[str, Inputs], tuple[Tensor, ...]]
    verify: Callable[[Inputs, tuple[Tensor, ...]], Verdict]
    cases: Callable[[torch.device, torch.dtype], list[Case]]
    take: Callable[[Inputs, tuple[Tensor, ...], list[int]], tuple[Inputs, tuple[Tensor, ...]]]
    large: Callable[[], LargeCase]
    bench: Callable[[torch.device], BenchCase]
    backward: Callable[[str, Inputs], Verdict] | None = field(default=None)
