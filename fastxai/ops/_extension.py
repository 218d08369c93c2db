"""Loading the compiled ops (``fastxai._C``), once, for every front door."""

from __future__ import annotations

import os

_EXTENSION_LOADED = False
_EXTENSION_ERROR: str | None = None

if os.environ.get("FASTXAI_DISABLE_EXT", "0") == "1":
    _EXTENSION_ERROR = "disabled by FASTXAI_DISABLE_EXT=1"
else:
    try:
        from fastxai import _C  # noqa: F401  (loading registers torch.ops.fastxai.*)
        from fastxai.ops import _registrations  # noqa: F401

        _EXTENSION_LOADED = True
    except ImportError as exc:  # the package still works on the pure-PyTorch path
        _EXTENSION_ERROR = str(exc)


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
