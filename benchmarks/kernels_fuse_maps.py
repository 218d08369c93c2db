"""CPU timings of the fused ``fuse_maps`` kernel against the eager PyTorch reference.

Rows (float32, ``torch.set_num_threads(2)``): ``fastxai.ops.fuse_maps(raws, (224, 224), fusion)``
for N = 8 images and three layers' raw maps of 56, 28 and 14 px (a ResNet's layer1..3 at 224),
``"mean"`` and ``"tanh"`` fusion, against :func:`fastxai.ops.reference.fuse_maps` (per layer
ReLU, min-max and ``F.interpolate``, the ``(N, L, H, W)`` stack, then the fusion and min-max).

Timing as in ``kernels_cam_priors.py``: contenders interleaved in rotating order after one warm-up
each, medians, ``speed-up`` the median over rounds of ``eager / fused`` in the same round, only
trusted samples (CPU time >= 0.85 x threads x wall) when there are any.

Run ``PYTHONPATH=. python benchmarks/kernels_fuse_maps.py [--repeats R] [--threads T]``; the rows
go to ``benchmarks/results/kernels_fuse_maps.json`` (``--results``), rendered by
``benchmarks/tables.py``.
"""

from __future__ import annotations

import torch
from _kernel_rows import THREADS, summarise
from _kernel_rows import main as kernel_main
from _timing import interleave

import fastxai.ops as ops
from fastxai.ops import reference

N = 8
LAYER_SIZES = (56, 28, 14)
SIZE = (224, 224)


def _fuse_rows(repeats: int, fusion: str) -> list[dict]:
    generator = torch.Generator().manual_seed(2)
    raws = [torch.randn(N, s, s, generator=generator) for s in LAYER_SIZES]
    fused = ops.fuse_maps(raws, SIZE, fusion)
    torch.testing.assert_close(fused, reference.fuse_maps(raws, *SIZE, fusion), rtol=0, atol=1e-6)
    with torch.no_grad():
        samples = interleave(
            {
                "fused": lambda: ops.fuse_maps(raws, SIZE, fusion),
                "eager reference": lambda: reference.fuse_maps(raws, *SIZE, fusion),
            },
            repeats,
        )
    sizes = "/".join(str(s) for s in LAYER_SIZES)
    workload = f"fuse_maps {fusion}, N={N}, {sizes} -> {SIZE[0]}"
    return summarise(workload, samples, "fused", ["eager reference"])


def run(repeats: int, threads: int = THREADS) -> list[dict]:
    """Every row of the table: one dict per (workload, baseline) pair."""
    torch.set_num_threads(threads)
    return _fuse_rows(repeats, "mean") + _fuse_rows(repeats, "tanh")


if __name__ == "__main__":
    raise SystemExit(kernel_main(__file__, __doc__.splitlines()[0], run))
