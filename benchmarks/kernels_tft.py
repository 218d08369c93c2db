"""CPU timings of the fused TFT kernels against eager PyTorch, torch.compile and memory floors.

* ``tft_ladder`` at N=8, T=10 (the paper's ladder 0.0..0.9, value mode, binary mask), 3 x 224 x
  224 images from a 7 x 7 raw CAM. The ``out=`` variant (one preallocated 48 MB batch) against the
  eager reference (``fastxai.ops.reference.tft_ladder``), against ``torch.compile`` of that
  reference, and against its floor: ``out.copy_(src)`` of the same bytes into a preallocated
  buffer. The allocating variant against its floor: ``src.clone()`` of the same bytes (a fresh
  48 MB buffer pays its page faults either way).
* ``rpi_select`` at N=8, T=10, K=1000 against the eager reference.

Contenders of a group are timed in rounds, the order rotating every round (A B C, B C A, ...);
ratios are medians over rounds of ``contender / baseline`` in the same round, times are medians
(trusted samples only when there are any: ``benchmarks/_timing.py``).
Each sample records ``os.getloadavg()[0]`` and the process CPU time over the wall time (about 2
when both threads ran). Run ``python benchmarks/kernels_tft.py [--repeats R] [--threads 2]``; the
rows go to ``benchmarks/results/kernels_tft.json`` (``--results``), rendered by
``benchmarks/tables.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from _kernel_rows import THREADS
from _kernel_rows import main as kernel_main
from _timing import (
    Sample,
    interleave,
    median_cpu_per_wall,
    median_load,
    median_ms,
    paired_ratio,
    trusted_count,
)

import fastxai.ops as ops
from fastxai.ops import reference

N, T, C, SIZE, LOW = 8, 10, 3, 224, 7
CLASSES = 1000
COLUMNS = [
    ("op", "op"),
    ("contender", "contender"),
    ("baseline", "vs"),
    ("contender_ms", "contender ms", "{:.3f}"),
    ("baseline_ms", "vs ms", "{:.3f}"),
    ("ratio", "ratio", "{:.2f}"),
    ("target", "target"),
    ("met", "met"),
    ("load_1m", "load 1m", "{:.2f}"),
    ("cpu_wall", "CPU/wall (contender, vs)"),
    ("trusted", "trusted rounds"),
    ("note", "notes"),
]


def _row(
    op: str,
    samples: dict[str, list[Sample]],
    contender: str,
    baseline: str,
    target: str,
    meets: Callable[[float], bool],
    note: str = "",
) -> dict[str, Any]:
    mine, theirs = samples[contender], samples[baseline]
    ratio = paired_ratio(mine, theirs)
    return {
        "op": op,
        "contender": contender,
        "baseline": baseline,
        "contender_ms": median_ms(mine),
        "baseline_ms": median_ms(theirs),
        "ratio": ratio,
        "target": target or None,
        "met": ("yes" if meets(ratio) else "**no**") if target else None,
        "load_1m": median_load(mine, theirs),
        "cpu_wall": f"{median_cpu_per_wall(mine):.2f}, {median_cpu_per_wall(theirs):.2f}",
        "trusted": trusted_count(mine, theirs),
        "repeats": len(mine),
        "note": note,
    }


def _ladder_rows(repeats: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(N, LOW, LOW, generator=g)
    images = torch.randn(N, C, SIZE, SIZE, generator=g)
    thresholds = torch.tensor([i / 10 for i in range(T)], dtype=torch.float64)
    out = torch.empty(N * T, C, SIZE, SIZE)
    src = torch.randn(N * T, C, SIZE, SIZE, generator=g)
    floor_out = torch.empty_like(src)

    masked, maps = ops.tft_ladder(raw, images, thresholds, out=out)
    expected, expected_maps = reference.tft_ladder(raw, images, thresholds)
    map_diff = (maps - expected_maps).abs().max().item()
    batch_diff = (masked - expected).abs().max().item()
    compiled_reference = torch.compile(reference.tft_ladder)
    compiled_reference(raw, images, thresholds)  # compile outside the timing
    note = f"max abs diff to reference: map {map_diff:.1e}, batch {batch_diff:.1e}"

    out_samples = interleave(
        {
            "fused out=": lambda: ops.tft_ladder(raw, images, thresholds, out=out),
            "eager reference": lambda: reference.tft_ladder(raw, images, thresholds),
            "compiled reference": lambda: compiled_reference(raw, images, thresholds),
            "floor out.copy_(src)": lambda: floor_out.copy_(src),
        },
        repeats,
        inner=1,
    )
    alloc_samples = interleave(
        {
            "fused allocating": lambda: ops.tft_ladder(raw, images, thresholds),
            "floor src.clone()": lambda: src.clone(),
        },
        repeats,
        inner=1,
    )
    op = f"tft_ladder N={N} T={T} {C}x{SIZE}x{SIZE} from {LOW}x{LOW}"
    return [
        _row(op, out_samples, "fused out=", "eager reference", "<= 0.5", lambda r: r <= 0.5, note),
        _row(op, out_samples, "fused out=", "compiled reference", "", lambda r: True),
        _row(op, out_samples, "fused out=", "floor out.copy_(src)", "<= 1.5", lambda r: r <= 1.5),
        _row(
            op, alloc_samples, "fused allocating", "floor src.clone()", "<= 1.5", lambda r: r <= 1.5
        ),
    ]


def _select_rows(repeats: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(N * T, CLASSES, generator=g) * 3
    classes = torch.randint(0, CLASSES, (N,), generator=g)
    original = torch.rand(N, generator=g) * 0.01
    rpi, index, _ = ops.rpi_select(logits, classes, original)
    expected_rpi, expected_index, _ = reference.rpi_select(logits, classes, original)
    scale = 1 + expected_rpi.abs()
    note = (
        f"max |rpi diff| / (1 + rpi): {((rpi - expected_rpi).abs() / scale).max().item():.1e}, "
        f"index equal: {torch.equal(index, expected_index)}"
    )
    samples = interleave(
        {
            "fused": lambda: ops.rpi_select(logits, classes, original),
            "eager reference": lambda: reference.rpi_select(logits, classes, original),
        },
        repeats,
        inner=50,
    )
    op = f"rpi_select N={N} T={T} K={CLASSES}"
    return [_row(op, samples, "fused", "eager reference", "<= 1.0", lambda r: r <= 1.0, note)]


def run(repeats: int = 15, threads: int = THREADS) -> list[dict[str, Any]]:
    """Timing rows of both ops (see the module docstring), CPU, ``torch.set_num_threads(2)``."""
    if not ops.has_extension():
        raise RuntimeError(f"the fused kernels need fastxai._C: {ops.extension_status()}")
    torch.set_num_threads(threads)
    with torch.inference_mode():
        return _ladder_rows(repeats) + _select_rows(repeats)


if __name__ == "__main__":
    raise SystemExit(kernel_main(__file__, __doc__.splitlines()[0], run, COLUMNS))
