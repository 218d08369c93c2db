"""Pure-PyTorch implementations of every fastxai op: the test oracle and the fallback path."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

MINMAX_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image epsilon


def minmax(z: Tensor, eps: float = MINMAX_EPS) -> Tensor:
    r"""Per-map min-max over the last two dims.

    :math:`(z - \min z) / (\max(z - \min z) + \epsilon)`.
    """
    flat = z.flatten(-2)
    shifted = flat - flat.amin(-1, keepdim=True)
    scaled = shifted / (shifted.amax(-1, keepdim=True) + eps)
    return scaled.view_as(z)


def scale_maps(raw: Tensor, height: int, width: int) -> Tensor:
    r"""ReLU, min-max, bilinear upsample (``align_corners=False``) to ``(height, width)``, min-max.

    :math:`M = \mathrm{mm}(\mathrm{up}(\mathrm{mm}(\max(\mathrm{raw}, 0))))` per map, with
    :math:`\mathrm{mm}(z) = (z - \min z) / (\max(z - \min z) + 10^{-7})`: pytorch-grad-cam's
    ``scale_cam_image`` pipeline for one layer. ``raw`` is ``(N, h, w)``; returns ``(N, H, W)``.
    """
    low = minmax(raw.clamp_min(0))
    if raw.shape[0] == 0:
        return raw.new_zeros((0, height, width))
    up = F.interpolate(low[:, None], size=(height, width), mode="bilinear", align_corners=False)[
        :, 0
    ]
    return minmax(up)


def upsample_normalized(raw: Tensor, height: int, width: int) -> Tensor:
    r""":math:`\mathrm{up}(\mathrm{mm}(\max(\mathrm{raw}, 0)))`: one layer's map before the final
    min-max, as pytorch-grad-cam keeps it when it averages several layers."""
    low = minmax(raw.clamp_min(0))
    if raw.shape[0] == 0:
        return raw.new_zeros((0, height, width))
    return F.interpolate(low[:, None], size=(height, width), mode="bilinear", align_corners=False)[
        :, 0
    ]
