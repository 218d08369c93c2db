"""The kernel front door: one function per fused op, each picking a backend.

``backend="auto"`` runs the compiled C++ op (``fastxai._C``) for CPU tensors when the extension is
loaded, and the pure-PyTorch reference (``fastxai.ops.reference``) otherwise; ``"torch"`` forces
the reference, ``"cpp"`` forces the extension. ``FASTXAI_DISABLE_EXT=1`` makes the package behave
as if the extension were absent.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor

from fastxai.ops import reference

Backend = Literal["auto", "torch", "cpp"]

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
    """A one-line description of the active kernel path, for logs and the CLI."""
    if _EXTENSION_LOADED:
        return "fastxai._C loaded (C++ CPU kernels)"
    return f"pure-PyTorch reference ops ({_EXTENSION_ERROR})"


def _use_cpp(t: Tensor, backend: Backend) -> bool:
    if backend == "torch":
        return False
    if backend == "cpp":
        if not _EXTENSION_LOADED:
            raise RuntimeError(f"backend='cpp' requested but {extension_status()}")
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'torch' or 'cpp', got {backend!r}")
    if torch.is_grad_enabled() and t.requires_grad:
        return False  # the C++ scale_maps has no backward yet; the reference is differentiable
    return (
        _EXTENSION_LOADED
        and t.device.type == "cpu"
        and t.dtype
        in (
            torch.float32,
            torch.float64,
        )
    )


def scale_maps(raw: Tensor, size: tuple[int, int], *, backend: Backend = "auto") -> Tensor:
    r"""ReLU, min-max, bilinear upsample to ``size``, min-max: ``(N, h, w) -> (N, H, W)``.

    See :func:`fastxai.ops.reference.scale_maps` for the formula; the C++ kernel fuses the four
    steps into one pass per map.
    """
    height, width = int(size[0]), int(size[1])
    if _use_cpp(raw, backend):
        return torch.ops.fastxai.scale_maps(raw, height, width)
    return reference.scale_maps(raw, height, width)


# Last: these front doors call has_extension() above.
from fastxai.ops._fuse_maps import fuse_maps  # noqa: E402, F401
from fastxai.ops._layercam_priors import layercam, mask_priors  # noqa: E402, F401
from fastxai.ops._tft_ops import rpi_select, tft_ladder, tft_mask  # noqa: E402, F401
