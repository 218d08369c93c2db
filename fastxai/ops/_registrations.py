"""Fake (meta) kernels of the ``torch.ops.fastxai`` C++ ops, for ``torch.compile`` and export.

Imported by :mod:`fastxai.ops` only once ``fastxai._C`` has loaded and declared the schemas.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.register_fake("fastxai::scale_maps")
def _scale_maps_fake(raw: Tensor, height: int, width: int) -> Tensor:
    """Shape of ``scale_maps``: ``(N, h, w) -> (N, height, width)``, same dtype and device."""
    torch._check(raw.dim() == 3, lambda: f"scale_maps: raw must be (N, h, w), got {raw.dim()} dims")
    torch._check(height > 0, lambda: f"scale_maps: height must be positive, got {height}")
    torch._check(width > 0, lambda: f"scale_maps: width must be positive, got {width}")
    return raw.new_empty((raw.shape[0], height, width))
