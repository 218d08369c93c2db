"""The kernel front door: one function per fused op, each picking a backend.

``backend="auto"`` runs the compiled C++ op (``fastxai._C``) for CPU tensors when the extension is
loaded, and the pure-PyTorch reference (``fastxai.ops.reference``) otherwise; ``"torch"`` forces
the reference, ``"cpp"`` forces the extension. ``FASTXAI_DISABLE_EXT=1`` makes the package behave
as if the extension were absent.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fastxai.ops import reference
from fastxai.ops._extension import extension_status, has_extension

Backend = Literal["auto", "torch", "cpp"]


def _use_cpp(t: Tensor, backend: Backend) -> bool:
    if backend == "torch":
        return False
    if backend == "cpp":
        if not has_extension():
            raise RuntimeError(f"backend='cpp' requested but {extension_status()}")
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'torch' or 'cpp', got {backend!r}")
    if torch.is_grad_enabled() and t.requires_grad:
        return False  # the C++ scale_maps has no backward yet; the reference is differentiable
    return (
        has_extension()
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


from fastxai.ops._fuse_maps import fuse_maps  # noqa: E402, F401
from fastxai.ops._layercam_priors import layercam, mask_priors  # noqa: E402, F401
from fastxai.ops._tft_ops import rpi_select, tft_ladder, tft_mask  # noqa: E402, F401
