"""``fastxai selftest``: its checks pass on this machine's kernels and catch broken ones.

The broken kernels wrap the ``fastxai.ops`` front door the selftest calls and corrupt the
kernel's result in one way each (the reference, ``backend="torch"``, stays intact); the selftest
must then fail exactly the checks that input exercises and exit with status 1.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

import fastxai.ops as ops
import fastxai.selftest as selftest
from fastxai.cli import main as cli_main
from fastxai.ops._dispatch import OPS
from fastxai.selftest import _cam_priors, _maps, _tft
from fastxai.selftest._runner import CHECKS, large_verdict, run_checks

requires_extension = pytest.mark.skipif(
    not ops.has_extension(), reason=f"C++ ops not available: {ops.extension_status()}"
)
CPU = torch.device("cpu")


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    status = cli_main(["selftest", *argv])
    return status, capsys.readouterr().out.splitlines()


def test_every_fused_op_has_a_check():
    assert [check.op for check in CHECKS] == list(OPS)


@requires_extension
def test_checks_pass_on_the_cpu(capsys):
    status, lines = _run(["--quick", "--device", "cpu"], capsys)
    failures = [line for line in lines if line.startswith("FAIL")]
    assert status == 0, "\n".join(failures)
    assert not failures
    assert lines[-1] == "selftest: PASS"
    for op in OPS:
        passed = [line for line in lines if line.startswith("PASS") and f" {op} " in line]
        # every case in float32 and float64 (and the backward of the differentiable ops)
        assert len(passed) >= 10, op
    for edge in ("N=0", "NaN", "ties", "non-contiguous", "65537 planes"):
        assert sum(edge in line for line in lines if line.startswith("PASS")) >= 8, edge


def _with_broken_layercam(monkeypatch, corrupt) -> None:
    """``ops.layercam`` whose kernels (not the reference) return ``corrupt(out)``."""
    real = ops.layercam

    def broken(gradient, activation, *, backend="auto"):
        out = real(gradient, activation, backend=backend)
        return out if backend == "torch" else corrupt(out)

    monkeypatch.setattr(ops, "layercam", broken)


class _GradientOffByOnePercent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out):
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


@requires_extension
@pytest.mark.parametrize(
    ("corrupt", "failing"),
    [
        pytest.param(lambda out: out + 1e-3, None, id="offset-everywhere"),
        pytest.param(lambda out: out.nan_to_num(0.0), "NaN", id="drops-nan"),
        pytest.param(
            lambda out: torch.cat([out[:65535], 0 * out[65535:]]) if len(out) > 65535 else out,
            "65537 planes",
            id="grid-limit",
        ),
        pytest.param(lambda out: _GradientOffByOnePercent.apply(out), "backward", id="gradient"),
    ],
)
def test_a_broken_kernel_fails_the_selftest(monkeypatch, capsys, corrupt, failing):
    _with_broken_layercam(monkeypatch, corrupt)
    status, lines = _run(["--quick", "--device", "cpu", "--ops", "layercam"], capsys)
    assert status == 1
    assert lines[-1] == "selftest: FAIL"
    failures = [line for line in lines if line.startswith("FAIL  layercam")]
    assert failures
    if failing is None:  # every forward check with a non-empty map
        assert sum(" forward " in line for line in failures) >= 14
    elif failing == "backward":
        assert all(" backward " in line for line in failures)
        assert not any(line.startswith("FAIL") and " forward " in line for line in lines)
    else:
        assert all(failing in line for line in failures), failures


@requires_extension
def test_an_exception_in_a_kernel_is_a_failed_check(monkeypatch):
    def raising(*args, **kwargs):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(ops, "mask_priors", raising)
    lines: list[str] = []
    summary = run_checks([CPU], lines.append, large=False, ops=["mask_priors"])
    assert summary.passed == 0 and summary.failed == len(lines) > 0
    assert all("raised RuntimeError: kernel exploded" in line for line in summary.failures)


@requires_extension
@pytest.mark.parametrize("check", CHECKS, ids=[c.op for c in CHECKS])
def test_large_index_cases_compare_their_first_and_last_samples(monkeypatch, check):
    """The past-2**31 cases, shrunk to a few small samples so that they run on the CPU: the
    kernel's first and last samples match the reference's, and swapped ones do not."""
    for module, names in [
        (_maps, {"LARGE_MAPS": 3, "LARGE_SIZE": 9}),
        (_cam_priors, {"LARGE_PLANES": 3, "LARGE_SIZE": 6}),
        (_tft, {"LARGE_IMAGES": 3, "LARGE_SIZE": 7, "LARGE_T": 4}),
        (_tft, {"LARGE_N": 3, "LARGE_ROWS_PER_IMAGE": 2, "LARGE_K": 5}),
    ]:
        for name, value in names.items():
            monkeypatch.setattr(module, name, value)
    large = check.large()
    assert large.bytes_needed > 0
    verdict = large_verdict(check, "cpp", CPU, large)
    assert verdict.passed, verdict.detail

    torch.manual_seed(0)
    inputs = large.build(CPU)
    first, last = large.samples(inputs)
    assert first == 0 and last > 0
    outputs = check.run("cpp", inputs)
    taken_inputs, _ = check.take(inputs, outputs, [first, last])
    _, swapped_outputs = check.take(inputs, outputs, [last, first])
    assert not check.verify(taken_inputs, swapped_outputs).passed


def test_cli_selftest_passes_its_options(monkeypatch):
    seen = {}

    def fake_run(**options):
        seen.update(options)
        return 7

    monkeypatch.setattr(selftest, "run_selftest", fake_run)
    argv = ["selftest", "--quick", "--device", "cpu", "--seconds", "5", "--ops", "layercam"]
    assert cli_main(argv) == 7
    assert seen == {"device": "cpu", "ops": ["layercam"], "quick": True, "seconds": 5.0}
    assert cli_main(["selftest"]) == 7
    assert seen == {"device": "all", "ops": None, "quick": False, "seconds": 30.0}


def test_bad_options_are_one_line_errors(capsys):
    assert cli_main(["selftest", "--device", "tpu"]) == 2
    assert "--device: invalid choice: 'tpu'" in capsys.readouterr().err
    assert cli_main(["selftest", "--seconds", "-1", "--quick"]) == 2
    assert capsys.readouterr().err == "fastxai selftest: error: --seconds must be >= 0, got -1\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_cuda_device_is_an_error(capsys):
    assert cli_main(["selftest", "--device", "cuda", "--quick"]) == 2
    assert capsys.readouterr().err == (
        "fastxai selftest: error: --device cuda: no CUDA device found\n"
    )


def test_python_dash_m_runs_the_cli_command():
    result = subprocess.run(
        [sys.executable, "-m", "fastxai.selftest", "--device", "tpu"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert result.returncode == 2
    assert "fastxai selftest: error: argument --device: invalid choice: 'tpu'" in result.stderr


@requires_extension
def test_benchmark_table_has_a_row_per_kernel(capsys):
    """The table's plumbing on two cheap ops with no time budget (three rounds each); its
    numbers are measurements, not asserted."""
    from fastxai.selftest._bench import markdown, run_benchmarks

    rows = run_benchmarks([CPU], 0.0, print, ops=["rpi_select", "mask_priors"])
    assert [(r.op, r.backend, r.device) for r in rows] == [
        ("mask_priors", "cpp", "cpu"),
        ("rpi_select", "cpp", "cpu"),
    ]
    for row in rows:
        assert row.rounds == 3 and row.kernel_ms > 0 and row.reference_ms > 0
        assert row.gb_per_s > 0 and row.cpu_per_wall is not None
    table = markdown(rows).splitlines()
    assert table[0].startswith("| op | backend | device | shape | kernel ms | reference ms |")
    assert len(table) == 4 and table[2].startswith("| mask_priors | cpp | cpu | (32, 1, 224, 224)")
    assert capsys.readouterr().out == ""
