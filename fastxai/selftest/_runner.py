"""Running every op's checks on every device and backend, one PASS / FAIL / SKIP line each."""

from __future__ import annotations

import gc
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastxai.ops._dispatch import CPP_OPS, CUDA_KERNELS
from fastxai.selftest._cam_priors import LAYERCAM, MASK_PRIORS
from fastxai.selftest._core import DTYPES, Case, LargeCase, OpCheck, Verdict
from fastxai.selftest._maps import FUSE_MAPS, SCALE_MAPS
from fastxai.selftest._tft import RPI_SELECT, TFT_LADDER, TFT_LADDER_OUT, TFT_MASK

CHECKS: tuple[OpCheck, ...] = (
    SCALE_MAPS,
    FUSE_MAPS,
    LAYERCAM,
    MASK_PRIORS,
    TFT_LADDER,
    TFT_LADDER_OUT,
    TFT_MASK,
    RPI_SELECT,
)
GIB = 1 << 30

Report = Callable[[str], None]


@dataclass
class Summary:
    """Counts of the checks and the lines of the failed ones."""

    passed: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)

    def record(self, status: str, line: str, report: Report) -> None:
        text = f"{status}  {line}"
        if status == "PASS":
            self.passed += 1
        elif status == "SKIP":
            self.skipped += 1
        else:
            self.failures.append(text)
        report(text)


def find_devices(choice: str) -> list[torch.device]:
    """The devices ``--device`` names: ``cpu``, every CUDA device (``cuda``), or both (``all``)."""
    cuda = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if choice == "cpu":
        return [torch.device("cpu")]
    if choice == "cuda":
        return cuda
    return [torch.device("cpu"), *cuda]


def triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def kernel_backends(op: str, device: torch.device) -> tuple[list[str], str]:
    """The kernels of ``op`` on ``device`` (the reference is the oracle, not a contender), and
    why there are none when the list is empty."""
    if device.type == "cpu":
        if CPP_OPS[op]:
            return ["cpp"], ""
        return [], "no C++ kernel (fastxai._C not loaded or built without it)"
    found = []
    if CUDA_KERNELS[op]:
        found.append("cpp")
    if triton_available():
        found.append("triton")
    reason = "" if found else "no CUDA kernel built and no Triton kernel or triton not installed"
    return found, reason


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"[:300]


def _attempt(step: Callable[..., Verdict], *args: Any) -> Verdict:
    try:
        return step(*args)
    except Exception as exc:  # a kernel that raises is a failed check, not a crashed selftest
        return Verdict(False, float("inf"), f"raised {_first_line(exc)}")


def _forward(check: OpCheck, backend: str, inputs: dict) -> Verdict:
    return check.verify(inputs, check.run(backend, inputs))


def _backward(check: OpCheck, backend: str, inputs: dict) -> Verdict:
    assert check.backward is not None
    return check.backward(backend, inputs)


def _check_case(
    check: OpCheck, backend: str, label: str, case: Case, summary: Summary, report: Report
) -> None:
    """The forward check of ``case`` and, for ops with a backward, the gradient check."""
    where = f"{case.name} {case.shape}"
    steps = [("forward ", _forward)]
    if check.backward is not None:
        steps.append(("backward", _backward))
    for direction, step in steps:
        verdict = _attempt(step, check, backend, case.inputs)
        status = "PASS" if verdict.passed else "FAIL"
        summary.record(status, f"{label} {direction} {where}: {_detail(verdict)}", report)


def selected(ops: Sequence[str] | None) -> tuple[OpCheck, ...]:
    """The checks of ``ops`` (every op when None), in the order of :data:`CHECKS`."""
    return tuple(check for check in CHECKS if ops is None or check.op in ops)


def check_device(
    device: torch.device,
    summary: Summary,
    report: Report,
    *,
    large: bool = True,
    ops: Sequence[str] | None = None,
) -> None:
    """Every op, backend, dtype and case on ``device``; then the past-2**31 cases on a GPU."""
    name = str(device)
    for check in selected(ops):
        backends, reason = kernel_backends(check.op, device)
        if not backends:
            summary.record("SKIP", f"{check.op:<14} {name}: skipped: {reason}", report)
            continue
        for backend in backends:
            for dtype in DTYPES:
                label = f"{check.op:<14} {backend:<6} {name:<6} {str(dtype)[6:]:<7}"
                for case in check.cases(device, dtype):
                    _check_case(check, backend, label, case, summary, report)
    if not large:
        return
    if device.type != "cuda":
        summary.record(
            "SKIP",
            f"{'past 2**31':<14} {name}: skipped: indices past 2**31 are checked on CUDA devices",
            report,
        )
        return
    for check in selected(ops):
        for backend in kernel_backends(check.op, device)[0]:
            _check_large(check, backend, device, summary, report)


def _detail(verdict: Verdict) -> str:
    if verdict.detail:
        return verdict.detail
    return "exact" if verdict.worst == 0 else f"worst {verdict.worst:.2g} x tolerance"


def large_verdict(check: OpCheck, backend: str, device: torch.device, large: LargeCase) -> Verdict:
    """Run ``backend`` on the large inputs and compare their first and last samples."""
    torch.manual_seed(0)
    inputs = large.build(device)
    outputs = check.run(backend, inputs)
    taken_inputs, taken_outputs = check.take(inputs, outputs, large.samples(inputs))
    del inputs, outputs
    return check.verify(taken_inputs, taken_outputs)


def _check_large(
    check: OpCheck, backend: str, device: torch.device, summary: Summary, report: Report
) -> None:
    large: LargeCase = check.large()
    label = f"{check.op:<14} {backend:<6} {device!s:<6} float32 past 2**31 {large.shape}"
    free, _ = torch.cuda.mem_get_info(device)
    if free < large.bytes_needed:
        needed, available = large.bytes_needed / GIB, free / GIB
        summary.record(
            "SKIP", f"{label}: skipped: needs {needed:.1f} GiB, {available:.1f} GiB free", report
        )
        return

    verdict = _attempt(lambda: large_verdict(check, backend, device, large))
    gc.collect()
    torch.cuda.empty_cache()
    status = "PASS" if verdict.passed else "FAIL"
    summary.record(status, f"{label} (first and last samples): {_detail(verdict)}", report)


def run_checks(
    devices: list[torch.device],
    report: Report = print,
    *,
    large: bool = True,
    ops: Sequence[str] | None = None,
) -> Summary:
    """The check part of the selftest on ``devices`` for ``ops`` (default: all);
    ``large=False`` leaves out the past-2**31 cases."""
    summary = Summary()
    for device in devices:
        check_device(device, summary, report, large=large, ops=ops)
    return summary
