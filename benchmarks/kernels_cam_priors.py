"""CPU timings of the fused ``layercam`` and ``mask_priors`` kernels against eager PyTorch.

Rows (float32, ``torch.set_num_threads(2)``):

* ``layercam`` forward at (32, 512, 28, 28): ``fastxai.ops.layercam(g, A)`` against eager
  ``(relu(g) * A).sum(1).relu()``.
* ``layercam`` forward + backward: the same, then ``torch.autograd.grad`` of the map with respect
  to both inputs (a random upstream gradient), against eager autograd.
* ``mask_priors`` forward + backward at (16, 1, 224, 224), 4 and 8 neighbours: the weighted sum of
  the three per-sample terms and its gradient with respect to ``p``, against eager autograd of
  :func:`fastxai.ops.reference.mask_priors` and against ``torch.compile`` of that reference
  (compiled once, before the timing).

Contenders of a row run interleaved (the order rotates every round: A B, B A, ...); each is
warmed up once. Times are medians; ``speed-up`` is the median over rounds of
``baseline / fused`` in the same round. A sample is trusted when the process CPU time is at least
0.85x the thread count times its wall time (every thread ran: 1.7x for 2 threads); only trusted
samples count when a contender has any. On a shared machine, 2-thread timings of millisecond
kernels are dominated by OpenMP threads waiting for a descheduled sibling at each barrier;
``--threads 1`` then gives the steadier comparison.

Run ``PYTHONPATH=. python benchmarks/kernels_cam_priors.py [--repeats R] [--threads T]``; the rows
go to ``benchmarks/results/kernels_cam_priors.json`` (``--results``), rendered by
``benchmarks/tables.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from _kernel_rows import THREADS, summarise
from _kernel_rows import main as kernel_main
from _timing import interleave
from torch import Tensor

import fastxai.ops as ops
from fastxai.ops import reference

LAYERCAM_SHAPE = (32, 512, 28, 28)
MASK_SHAPE = (16, 1, 224, 224)
PRIOR_WEIGHTS = (100.0, 1.0, 15.0)  # lambda_area, lambda_bin, lambda_tv of the AM paper's CVPR text


def _eager_layercam(g: Tensor, a: Tensor) -> Tensor:
    return (torch.relu(g) * a).sum(1).relu()


def _layercam_rows(repeats: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    g = torch.randn(LAYERCAM_SHAPE, generator=generator)
    a = torch.randn(LAYERCAM_SHAPE, generator=generator).relu()
    upstream = torch.randn(LAYERCAM_SHAPE[0], *LAYERCAM_SHAPE[2:], generator=generator)
    torch.testing.assert_close(ops.layercam(g, a), _eager_layercam(g, a), rtol=1e-5, atol=1e-4)

    with torch.no_grad():
        forward = interleave(
            {"fused": lambda: ops.layercam(g, a), "eager": lambda: _eager_layercam(g, a)}, repeats
        )
    rows = summarise("layercam forward", forward, "fused", ["eager"])

    g_leaf, a_leaf = g.clone().requires_grad_(), a.clone().requires_grad_()

    def fused_backward() -> tuple[Tensor, ...]:
        return torch.autograd.grad(ops.layercam(g_leaf, a_leaf), (g_leaf, a_leaf), upstream)

    def eager_backward() -> tuple[Tensor, ...]:
        return torch.autograd.grad(_eager_layercam(g_leaf, a_leaf), (g_leaf, a_leaf), upstream)

    torch.testing.assert_close(fused_backward(), eager_backward(), rtol=1e-5, atol=1e-5)
    both = interleave({"fused": fused_backward, "eager autograd": eager_backward}, repeats)
    rows += summarise("layercam forward+backward", both, "fused", ["eager autograd"])
    return rows


def _mask_prior_rows(repeats: int, neighbours: int) -> list[dict]:
    p = torch.rand(MASK_SHAPE, generator=torch.Generator().manual_seed(1)).requires_grad_()
    weights = torch.tensor(PRIOR_WEIGHTS)

    def fused_loss(x: Tensor) -> Tensor:
        return (ops.mask_priors(x, neighbours) * weights).sum()

    def reference_loss(x: Tensor) -> Tensor:
        return (reference.mask_priors(x, neighbours) * weights).sum()

    compiled_loss = torch.compile(reference_loss, fullgraph=True)

    def gradient_of(loss: Callable[[Tensor], Tensor]) -> Callable[[], Tensor]:
        return lambda: torch.autograd.grad(loss(p), p)[0]

    contenders = {
        "fused": gradient_of(fused_loss),
        "eager autograd": gradient_of(reference_loss),
        "compiled reference": gradient_of(compiled_loss),
    }
    expected = contenders["eager autograd"]()
    for name in ("fused", "compiled reference"):
        torch.testing.assert_close(contenders[name](), expected, rtol=1e-5, atol=1e-9, msg=name)
    samples = interleave(contenders, repeats)
    return summarise(
        f"mask_priors fwd+bwd, {neighbours}-neighbour",
        samples,
        "fused",
        ["eager autograd", "compiled reference"],
    )


def run(repeats: int, threads: int = THREADS) -> list[dict]:
    """Every row of the table: one dict per (workload, baseline) pair."""
    torch.set_num_threads(threads)
    rows = _layercam_rows(repeats)
    for neighbours in (4, 8):
        rows += _mask_prior_rows(repeats, neighbours)
    return rows


if __name__ == "__main__":
    raise SystemExit(kernel_main(__file__, __doc__.splitlines()[0], run))
