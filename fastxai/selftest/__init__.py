"""Device self-test of the fused ops: ``fastxai selftest`` or ``python -m fastxai.selftest``.

On the CPU and on every CUDA device, every fused op (:data:`fastxai.ops._dispatch.OPS`) is run
on every kernel available there (C++ on the CPU; C++ CUDA and Triton on a GPU) and compared with
the PyTorch reference (:mod:`fastxai.ops.reference`) evaluated in float64, in float32 and float64,
on random inputs and on edge inputs: N=0, NaN, ties, non-contiguous views, more than 65535
planes, and on a GPU inputs whose indices run past 2**31 (skipped with the memory it needs where
the device has less free). ``layercam`` and ``mask_priors`` also compare their gradients with the
reference's autograd. Each op's module states its tolerances and why. One PASS / FAIL / SKIP line
per check, a summary, exit status 1 on any failure.

Then, unless ``--quick``, a benchmark table of each kernel against the reference (``--seconds``
in all): interleaved rounds, medians, the speed-up and the achieved GB/s.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

DEVICE_CHOICES = ("cpu", "cuda", "all")
DEFAULT_SECONDS = 30.0


def _environment(devices: list) -> list[str]:
    import torch

    from fastxai._machine import cpu_name
    from fastxai.ops import extension_status

    lines = [
        f"torch {torch.__version__}; cpu: {cpu_name()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads",
        extension_status(),
    ]
    lines += [f"{d}: {torch.cuda.get_device_name(d)}" for d in devices if d.type == "cuda"]
    return lines


class NoDeviceError(RuntimeError):
    """``device="cuda"`` on a machine without a CUDA device."""


def run_selftest(
    *,
    device: str = "all",
    ops: Sequence[str] | None = None,
    quick: bool = False,
    seconds: float = DEFAULT_SECONDS,
    out: TextIO | None = None,
) -> int:
    """Run the selftest on ``device`` (``"cpu"``, ``"cuda"`` or ``"all"``) for ``ops`` (default:
    every fused op), printing to ``out`` (default: stdout); the benchmark table unless ``quick``,
    in about ``seconds``. Returns the exit status: 0 when every check passed, else 1."""
    out = sys.stdout if out is None else out

    def report(line: str) -> None:
        print(line, file=out, flush=True)

    from fastxai.selftest._runner import find_devices, run_checks

    devices = find_devices(device)
    if not devices:
        raise NoDeviceError("no CUDA device found")
    for line in _environment(devices):
        report(line)
    start = time.perf_counter()
    summary = run_checks(devices, report, ops=ops)
    names = ", ".join(str(d) for d in devices)
    report(
        f"selftest checks on {names}: {summary.passed} passed, {summary.failed} failed, "
        f"{summary.skipped} skipped in {time.perf_counter() - start:.0f} s"
    )
    for line in summary.failures:
        report(line)
    if not quick:
        from fastxai.selftest._bench import markdown, run_benchmarks

        report("")
        report(markdown(run_benchmarks(devices, seconds, report, ops)))
    report("selftest: PASS" if summary.failed == 0 else "selftest: FAIL")
    return 0 if summary.failed == 0 else 1
