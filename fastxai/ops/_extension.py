"""Loading the compiled ops (``fastxai._C``), once, for every front door.

The build records the torch it compiled against in ``fastxai/_torch_build.py`` (written by
``setup.py``). An extension built for another torch is not loaded (its C++ ABI may differ, and a
mismatch can crash the process rather than raise): the package warns in one line how to rebuild
and runs the PyTorch reference. So does an extension that fails to load (``undefined symbol``).
"""

from __future__ import annotations

import importlib
import os
import warnings

REBUILD = "pip install --no-build-isolation -e ."


class ExtensionWarning(UserWarning):
    """``fastxai._C`` could not be used; the ops run their PyTorch reference."""


def recorded_torch_version() -> str | None:
    """The torch version ``fastxai._C`` was built against (``None``: not recorded)."""
    try:
        from fastxai._torch_build import TORCH_VERSION
    except ImportError:
        return None
    return TORCH_VERSION


def running_torch_version() -> str:
    import torch

    return torch.__version__


def _release(version: str) -> str:
    return version.split("+", 1)[0]  # 2.14.1+cu130 and 2.14.1+cpu share the release's ABI


def import_extension() -> None:
    """Load ``fastxai._C`` (registers ``torch.ops.fastxai.*``) and its fake kernels."""
    importlib.import_module("fastxai._C")
    importlib.import_module("fastxai.ops._registrations")


def load() -> tuple[bool, str | None]:
    """``(loaded, why not)``; warns (:class:`ExtensionWarning`) unless disabled on purpose."""
    if os.environ.get("FASTXAI_DISABLE_EXT", "0") == "1":
        return False, "disabled by FASTXAI_DISABLE_EXT=1"
    built, running = recorded_torch_version(), running_torch_version()
    if built is not None and _release(built) != _release(running):
        reason = f"built for torch {built}, running torch {running}"
    else:
        try:
            import_extension()
            return True, None
        except ImportError as exc:
            reason = " ".join(str(exc).split())
    warnings.warn(
        f"fastxai._C not loaded ({reason}); the ops run their PyTorch reference. "
        f"Rebuild it for this torch: {REBUILD}",
        ExtensionWarning,
        stacklevel=2,
    )
    return False, reason


_EXTENSION_LOADED, _EXTENSION_ERROR = load()


def has_extension() -> bool:
    """Whether the compiled ``fastxai._C`` ops are loaded (else every op runs its reference)."""
    return _EXTENSION_LOADED


def extension_status() -> str:
    """One line naming the kernels ``backend="auto"`` runs on each device, for logs and the CLI."""
    import importlib.util

    import torch

    triton = importlib.util.find_spec("triton") is not None
    if not _EXTENSION_LOADED:
        gpu = "Triton kernels" if triton else "the PyTorch reference"
        return (
            f"fastxai._C not loaded ({_EXTENSION_ERROR}): CPU: the PyTorch reference; CUDA: {gpu}"
        )
    if torch._C._dispatch_has_kernel_for_dispatch_key("fastxai::scale_maps", "CUDA"):
        gpu = "C++ CUDA kernels"
    else:
        gpu = "Triton kernels (fastxai._C built without CUDA)" if triton else "the reference"
    return f"fastxai._C loaded: CPU: C++ kernels; CUDA: {gpu}"
