"""The kernel front door: one function per fused op.

Each picks its implementation with :func:`fastxai.ops._dispatch.choose_backend`: ``"auto"``
calls ``torch.ops.fastxai.<op>`` where it has a kernel for the device (C++ on the CPU; C++ CUDA
or Triton on a GPU) and the pure-PyTorch reference (:mod:`fastxai.ops.reference`) otherwise;
``"cpp"``, ``"triton"`` and ``"torch"`` force one. ``FASTXAI_DISABLE_EXT=1`` makes the package
behave as if the extension were absent.
"""

from __future__ import annotations

from torch import Tensor

import fastxai.ops.reference as reference
from fastxai.ops._dispatch import Backend, choose_backend, kernel
from fastxai.ops._extension import extension_status, has_extension  # noqa: F401


def scale_maps(raw: Tensor, size: tuple[int, int], *, backend: Backend = "auto") -> Tensor:
    r"""ReLU, min-max, bilinear upsample to ``size``, min-max: ``(N, h, w) -> (N, H, W)``.

    See :func:`fastxai.ops.reference.scale_maps` for the formula; the kernels fuse the four
    steps into one pass per map.
    """
    height, width = int(size[0]), int(size[1])
    chosen = choose_backend("scale_maps", (raw,), backend)
    if chosen != "torch":
        return kernel("scale_maps", chosen)(raw, height, width)
    return reference.scale_maps(raw, height, width)


from fastxai.ops._fuse_maps import fuse_maps  # noqa: E402, F401
from fastxai.ops._layercam_priors import layercam, mask_priors  # noqa: E402, F401
from fastxai.ops._tft_ops import rpi_select, tft_ladder, tft_mask  # noqa: E402, F401
