"""An extension built for another torch is not loaded: one warning line says how to rebuild."""

from __future__ import annotations

import ast
import warnings

import pytest
import torch
from conftest import run_python

from fastxai.ops import _extension


def _never_imported() -> None:
    raise AssertionError("fastxai._C must not be loaded for another torch")


def _one_warning(caught: list[warnings.WarningMessage]) -> str:
    assert [w.category for w in caught] == [_extension.ExtensionWarning]
    message = str(caught[0].message)
    assert "\n" not in message
    assert _extension.REBUILD in message
    return message


def test_an_extension_built_for_another_torch_is_not_loaded_and_warns(monkeypatch):
    monkeypatch.delenv("FASTXAI_DISABLE_EXT", raising=False)
    monkeypatch.setattr(_extension, "recorded_torch_version", lambda: "2.9.1+cpu")
    monkeypatch.setattr(_extension, "running_torch_version", lambda: "2.14.1+cu130")
    monkeypatch.setattr(_extension, "import_extension", _never_imported)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels, reason = _extension.load()
    message = _one_warning(caught)
    assert kernels is None
    assert reason == "built for torch 2.9.1+cpu, running torch 2.14.1+cu130"
    assert reason in message


def test_an_extension_that_fails_to_load_warns_instead_of_falling_back_silently(monkeypatch):
    monkeypatch.delenv("FASTXAI_DISABLE_EXT", raising=False)
    monkeypatch.setattr(_extension, "recorded_torch_version", lambda: None)

    def undefined_symbol() -> None:
        raise ImportError(
            "/site-packages/fastxai/_C.so: undefined symbol:\n _ZN3c1017RegisterOperatorsD1Ev"
        )

    monkeypatch.setattr(_extension, "import_extension", undefined_symbol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels, reason = _extension.load()
    message = _one_warning(caught)
    assert kernels is None
    assert "undefined symbol: _ZN3c1017RegisterOperatorsD1Ev" in message
    assert reason in message


def test_the_same_release_with_another_local_build_tag_loads_without_a_warning(monkeypatch):
    monkeypatch.delenv("FASTXAI_DISABLE_EXT", raising=False)
    monkeypatch.setattr(_extension, "recorded_torch_version", lambda: "2.14.1+cpu")
    monkeypatch.setattr(_extension, "running_torch_version", lambda: "2.14.1+cu130")
    table = {"scale_maps": {"cpu": "cpp", "cuda": None}}
    monkeypatch.setattr(_extension, "import_extension", lambda: table)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _extension.load() == (table, None)
    assert caught == []


def test_disabling_the_extension_on_purpose_does_not_warn(monkeypatch):
    monkeypatch.setenv("FASTXAI_DISABLE_EXT", "1")
    monkeypatch.setattr(_extension, "import_extension", _never_imported)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _extension.load() == (None, "disabled by FASTXAI_DISABLE_EXT=1")
    assert caught == []


_MODEL_AND_MAPS = """
import torch, fastxai
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5)).eval()
maps = fastxai.gradcam(model, torch.randn(2, 3, 8, 8), "1").maps
"""


def test_importing_fastxai_with_a_stale_extension_warns_once_and_explains_on_the_reference():
    """A fresh interpreter whose recorded build torch differs: one warning line at import, no
    extension, and the same maps as here (within float32 rounding), from the reference ops."""
    script = (
        "import sys, types\n"
        "record = types.ModuleType('fastxai._torch_build')\n"
        "record.TORCH_VERSION = '1.0.0'\n"
        "sys.modules['fastxai._torch_build'] = record\n"
        + _MODEL_AND_MAPS
        + "print(fastxai.has_extension(), maps.flatten().tolist())\n"
    )
    done = run_python(script, FASTXAI_DISABLE_EXT=None)
    assert done.returncode == 0, done.stderr
    loaded, values = done.stdout.split(" ", 1)
    assert loaded == "False"
    here: dict = {}
    exec(_MODEL_AND_MAPS, here)
    there = torch.tensor(ast.literal_eval(values)).view(2, 8, 8)
    torch.testing.assert_close(there, here["maps"], atol=1e-6, rtol=0)
    warning_lines = [line for line in done.stderr.splitlines() if "ExtensionWarning" in line]
    assert len(warning_lines) == 1
    assert f"built for torch 1.0.0, running torch {torch.__version__}" in warning_lines[0]
    assert _extension.REBUILD in warning_lines[0]


@pytest.mark.skipif(_extension.recorded_torch_version() is None, reason="no recorded build")
def test_the_recorded_build_matches_the_running_torch_here():
    """Where setup.py recorded the build, this environment's torch is the one it built against
    (so the extension loaded)."""
    recorded = _extension.recorded_torch_version()
    assert recorded.split("+")[0] == torch.__version__.split("+")[0]
    assert _extension.has_extension()
