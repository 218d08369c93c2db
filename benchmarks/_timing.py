"""Timing shared by every benchmark: one sample, interleaved rounds, trust, medians and ratios.

A *sample* is one call (or the mean of ``inner`` back-to-back calls) with its wall time, the
process CPU time and the 1-minute load average just before it. On a shared 2-core machine a
multi-threaded call is only comparable when all its threads ran: a sample is *trusted* when
``cpu >= TRUST_PER_THREAD * threads * wall`` (1.7x wall for 2 threads). Summaries keep the trusted
samples when there are any and all of them otherwise, so a busy run still reports, flagged by its
trusted count.

Contenders run *interleaved*: round r times them in the order rotated by r (A B C, B C A, ...), so
a slow spell of the machine hits every contender alike, and ratios are medians over rounds of
``a / b`` within the same round.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

TRUST_PER_THREAD = 0.85


@dataclass(frozen=True)
class Sample:
    """Seconds of wall and process CPU time of one timed call, and the load before it."""

    wall: float
    cpu: float
    load: float

    @property
    def cpu_per_wall(self) -> float:
        return self.cpu / self.wall

    def trusted(self, threads: int | None = None) -> bool:
        """Every thread ran: ``cpu >= 0.85 * threads * wall`` (threads: torch's current count)."""
        threads = torch.get_num_threads() if threads is None else threads
        return self.cpu >= TRUST_PER_THREAD * threads * self.wall


def time_once(fn: Callable[[], Any], inner: int = 1) -> tuple[Sample, Any]:
    """Time ``inner`` back-to-back calls of ``fn`` (garbage collector off) and return the mean
    per-call sample with the last call's output."""
    gc.collect()
    load = os.getloadavg()[0]
    gc.disable()
    try:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(inner):
            out = fn()
        wall1, cpu1 = time.perf_counter(), time.process_time()
    finally:
        gc.enable()
    return Sample((wall1 - wall0) / inner, (cpu1 - cpu0) / inner, load), out


def interleave(
    contenders: dict[str, Callable[[], Any]],
    repeats: int,
    *,
    inner: int = 1,
    rotate: bool = True,
    report: Callable[[str, Sample], None] | None = None,
) -> dict[str, list[Sample]]:
    """One untimed warm-up call of each contender, then ``repeats`` rounds of one sample each,
    in an order that rotates every round (``rotate=False``: always the given order)."""
    for fn in contenders.values():
        fn()
    names = list(contenders)
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            sample, _ = time_once(contenders[name], inner)
            samples[name].append(sample)
            if report is not None:
                report(name, sample)
    return samples


def kept(samples: Sequence[Sample], threads: int | None = None) -> list[Sample]:
    """The trusted samples, or all of them when none is trusted."""
    return [s for s in samples if s.trusted(threads)] or list(samples)


def kept_pairs(
    a: Sequence[Sample], b: Sequence[Sample], threads: int | None = None
) -> list[tuple[Sample, Sample]]:
    """Same-round pairs where both samples are trusted, or every pair when there is none."""
    pairs = list(zip(a, b, strict=True))
    return [(x, y) for x, y in pairs if x.trusted(threads) and y.trusted(threads)] or pairs


def paired_ratio(a: Sequence[Sample], b: Sequence[Sample], threads: int | None = None) -> float:
    """Median over the kept rounds of ``wall(a) / wall(b)``."""
    return statistics.median(x.wall / y.wall for x, y in kept_pairs(a, b, threads))


def median_ms(samples: Sequence[Sample], threads: int | None = None) -> float:
    """Median wall time of the kept samples, in milliseconds."""
    return 1e3 * statistics.median(s.wall for s in kept(samples, threads))


def median_cpu_per_wall(samples: Sequence[Sample], threads: int | None = None) -> float:
    return statistics.median(s.cpu_per_wall for s in kept(samples, threads))


def median_load(*groups: Sequence[Sample]) -> float:
    return statistics.median(s.load for group in groups for s in group)


def trusted_count(a: Sequence[Sample], b: Sequence[Sample], threads: int | None = None) -> str:
    """``"trusted pairs/all pairs"`` of two contenders' rounds."""
    both = sum(x.trusted(threads) and y.trusted(threads) for x, y in zip(a, b, strict=True))
    return f"{both}/{min(len(a), len(b))}"
