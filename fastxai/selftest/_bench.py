"""The selftest's benchmark table: every kernel against the PyTorch reference on the same input.

Kernel and reference are timed *interleaved*: round r runs them in an order that alternates, so a
slow spell of a shared machine hits both; a sample is the mean of ``inner`` back-to-back calls
(enough for about 2 ms, with a device synchronisation at both ends on a GPU). Times are medians
over rounds and the speed-up is the median over rounds of reference / kernel within the round.
GB/s is the bytes the op must read and write (inputs once, outputs once) over the kernel's time.
On the CPU each row also gives the kernel's process CPU time over its wall time (about the thread
count when every thread ran) and the 1-minute load average, to tell a busy machine's rows apart.
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

from fastxai.selftest._core import OpCheck
from fastxai.selftest._runner import Report, kernel_backends, selected

SAMPLE_S = 2e-3
MIN_ROUNDS, MAX_ROUNDS = 3, 200


@dataclass(frozen=True)
class Row:
    op: str
    backend: str
    device: str
    shape: str
    kernel_ms: float
    reference_ms: float
    speedup: float
    gb_per_s: float
    rounds: int
    cpu_per_wall: float | None
    load: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Sample:
    """Wall and process CPU seconds per call."""

    wall: float
    cpu: float


def _time(fn: Callable[[], Any], device: torch.device, inner: int) -> Sample:
    """The mean of ``inner`` back-to-back calls (garbage collector off)."""
    gc.collect()
    gc.disable()
    try:
        _sync(device)
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        wall = time.perf_counter() - start
        return Sample(wall / inner, (time.process_time() - cpu) / inner)
    finally:
        gc.enable()


def interleaved(
    kernel: Callable[[], Any], reference: Callable[[], Any], device: torch.device, budget_s: float
) -> tuple[list[Sample], list[Sample]]:
    """Samples of each, one per round, rounds until ``budget_s`` is spent."""
    contenders = {"kernel": kernel, "reference": reference}
    inner = {}
    for name, fn in contenders.items():
        fn()  # warm-up: Triton compiles, the allocator and the pages settle
        once = _time(fn, device, 1).wall
        inner[name] = max(1, min(1000, int(SAMPLE_S / max(once, 1e-9))))
    samples: dict[str, list[Sample]] = {name: [] for name in contenders}
    order = list(contenders)
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and time.perf_counter() < deadline):
        for name in order if rounds % 2 == 0 else order[::-1]:
            samples[name].append(_time(contenders[name], device, inner[name]))
        rounds += 1
    return samples["kernel"], samples["reference"]


def _row(check: OpCheck, backend: str, device: torch.device, budget_s: float) -> Row:
    case = check.bench(device)
    load = os.getloadavg()[0]
    kernel, reference = interleaved(
        lambda: check.run(backend, case.inputs),
        lambda: check.run("torch", case.inputs),
        device,
        budget_s,
    )
    kernel_s = statistics.median(s.wall for s in kernel)
    on_cpu = device.type == "cpu"
    return Row(
        check.op,
        backend,
        str(device),
        case.shape,
        1e3 * kernel_s,
        1e3 * statistics.median(s.wall for s in reference),
        statistics.median(r.wall / k.wall for k, r in zip(kernel, reference, strict=True)),
        case.bytes_moved / kernel_s / 1e9,
        len(kernel),
        statistics.median(s.cpu / s.wall for s in kernel) if on_cpu else None,
        load,
    )


def run_benchmarks(
    devices: list[torch.device],
    seconds: float,
    report: Report,
    ops: Sequence[str] | None = None,
) -> list[Row]:
    """One row per op, kernel backend and device, sharing ``seconds`` between them."""
    work = [
        (check, backend, device)
        for device in devices
        for check in selected(ops)
        for backend in kernel_backends(check.op, device)[0]
    ]
    rows = []
    for check, backend, device in work:
        try:
            rows.append(_row(check, backend, device, seconds / max(1, len(work))))
        except Exception as exc:  # a failed kernel was reported by the checks already
            report(f"bench {check.op} {backend} {device}: not timed: {type(exc).__name__}: {exc}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(rows: list[Row]) -> str:
    header = (
        "| op | backend | device | shape | kernel ms | reference ms | speed-up | GB/s | rounds "
        "| CPU/wall | load |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r.op} | {r.backend} | {r.device} | {r.shape} | {_number(r.kernel_ms)} | "
        f"{_number(r.reference_ms)} | {r.speedup:.2f}x | {_number(r.gb_per_s)} | {r.rounds} | "
        f"{'-' if r.cpu_per_wall is None else f'{r.cpu_per_wall:.2f}'} | {r.load:.1f} |"
        for r in rows
    ]
    return "\n".join([header, *lines])


def _number(x: float) -> str:
    """Three significant digits without an exponent."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"
