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


def import_extension() -> dict[str, dict[str, str | None]]:
    """Load ``fastxai._C`` (declares ``torch.ops.fastxai.*``, registers the C++ kernels), then
    the Python registrations (:mod:`fastxai.ops._registrations`); returns the kernel table."""
    importlib.import_module("fastxai._C")
    return importlib.import_module("fastxai.ops._registrations").register()


def load() -> tuple[dict[str, dict[str, str | None]] | None, str | None]:
    """``(kernel table, why not loaded)``; warns (:class:`ExtensionWarning`) unless disabled on
    purpose."""
    if os.environ.get("FASTXAI_DISABLE_EXT", "0") == "1":
        return None, "disabled by FASTXAI_DISABLE_EXT=1"
    built, running = recorded_torch_version(), running_torch_version()
    if built is not None and _release(built) != _release(running):
        reason = f"built for torch {built}, running torch {running}"
    else:
        try:
            return import_extension(), None
        except ImportError as exc:
            reason = " ".join(str(exc).split())
    warnings.warn(
        f"fastxai._C not loaded ({reason}); the ops run their PyTorch reference. "
        f"Rebuild it for this torch: {REBUILD}",
        ExtensionWarning,
        stacklevel=2,
    )
    return None, reason


_KERNELS, _EXTENSION_ERROR = load()


def has_extension() -> bool:
    """Whether the compiled ``fastxai._C`` ops are loaded (else every op runs its reference)."""
    return _KERNELS is not None


def registered_kernel(op: str, device_type: str) -> str | None:
    """The kind of kernel ``torch.ops.fastxai.<op>`` runs on ``device_type`` (``"cpu"``,
    ``"cuda"``): ``"cpp"``, ``"triton"`` or ``None`` (no kernel, or no extension)."""
    if _KERNELS is None:
        return None
    return _KERNELS.get(op, {}).get(device_type)


_KIND_NAMES = {"cpp": "C++", "triton": "Triton", None: "reference"}


def _device_line(device_type: str) -> str:
    from fastxai.ops._registrations import FAKES

    kinds = {op: registered_kernel(op, device_type) for op in FAKES}
    if len(set(kinds.values())) == 1:
        kind = next(iter(kinds.values()))
        return f"{_KIND_NAMES[kind]} kernels" if kind else "the PyTorch reference"
    return ", ".join(f"{op} {_KIND_NAMES[kind]}" for op, kind in kinds.items())


def extension_status() -> str:
    """One line naming the kernels ``backend="auto"`` runs on each device, for logs and the CLI."""
    if _KERNELS is None:
        return f"fastxai._C not loaded ({_EXTENSION_ERROR}): every op runs the PyTorch reference"
    return f"fastxai._C loaded: CPU: {_device_line('cpu')}; CUDA: {_device_line('cuda')}"
