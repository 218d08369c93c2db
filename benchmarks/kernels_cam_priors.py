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

Run ``PYTHONPATH=. python benchmarks/kernels_cam_priors.py [--repeats R] [--threads T]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _timing import (
    Sample,
    interleave,
    median_cpu_per_wall,
    median_load,
    median_ms,
    paired_ratio,
    trusted_count,
)
from torch import Tensor

import fastxai.ops as ops
from fastxai.ops import reference

THREADS = 2
LAYERCAM_SHAPE = (32, 512, 28, 28)
MASK_SHAPE = (16, 1, 224, 224)
PRIOR_WEIGHTS = (100.0, 1.0, 15.0)  # lambda_area, lambda_bin, lambda_tv of the AM paper's CVPR text


def _summarise(
    workload: str, samples: dict[str, list[Sample]], fused: str, baselines: list[str]
) -> list[dict]:
    rows = []
    for baseline in baselines:
        mine, theirs = samples[fused], samples[baseline]
        rows.append(
            {
                "workload": workload,
                "baseline": baseline,
                "fused_ms": median_ms(mine),
                "baseline_ms": median_ms(theirs),
                "speedup": paired_ratio(theirs, mine),
                "load_1m": median_load(mine, theirs),
                "cpu_wall_fused": median_cpu_per_wall(mine),
                "cpu_wall_baseline": median_cpu_per_wall(theirs),
                "trusted": trusted_count(mine, theirs),
            }
        )
    return rows


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
    rows = _summarise("layercam forward", forward, "fused", ["eager"])

    g_leaf, a_leaf = g.clone().requires_grad_(), a.clone().requires_grad_()

    def fused_backward() -> tuple[Tensor, ...]:
        return torch.autograd.grad(ops.layercam(g_leaf, a_leaf), (g_leaf, a_leaf), upstream)

    def eager_backward() -> tuple[Tensor, ...]:
        return torch.autograd.grad(_eager_layercam(g_leaf, a_leaf), (g_leaf, a_leaf), upstream)

    torch.testing.assert_close(fused_backward(), eager_backward(), rtol=1e-5, atol=1e-5)
    both = interleave({"fused": fused_backward, "eager autograd": eager_backward}, repeats)
    rows += _summarise("layercam forward+backward", both, "fused", ["eager autograd"])
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
    return _summarise(
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


def markdown(rows: list[dict]) -> str:
    header = (
        "| workload | baseline | fused ms | baseline ms | speed-up | load 1m | CPU/wall fused, "
        "baseline | trusted rounds |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['workload']} | {r['baseline']} | {r['fused_ms']:.2f} | {r['baseline_ms']:.2f} | "
        f"{r['speedup']:.2f}x | {r['load_1m']:.2f} | {r['cpu_wall_fused']:.2f}, "
        f"{r['cpu_wall_baseline']:.2f} | {r['trusted']} |"
        for r in rows
    ]
    return "\n".join([header, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args()
    rows = run(args.repeats, args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"extension: {ops.extension_status()}\n"
    )
    print(markdown(rows))


if __name__ == "__main__":
    main()
