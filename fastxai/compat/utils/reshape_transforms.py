"""pytorch-grad-cam's ``utils.reshape_transforms``: layer outputs to ``(N, C, h, w)`` maps.

Pass one as ``reshape_transform=`` (use ``functools.partial`` for another grid size).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


def _tokens_to_maps(tokens: Tensor, height: int, width: int) -> Tensor:
    """``(N, h*w, C)`` tokens in row-major grid order -> ``(N, C, h, w)``."""
    n, count, channels = tokens.shape
    if count != height * width:
        raise ValueError(
            f"tensor: expected {height} x {width} = {height * width} grid tokens, got {count}; "
            "pass height= and width= of the model's token grid"
        )
    return tokens.reshape(n, height, width, channels).permute(0, 3, 1, 2)


def vit_reshape_transform(tensor: Tensor, height: int = 14, width: int = 14) -> Tensor:
    """ViT tokens ``(N, 1 + h*w, C)``: the class token is dropped, the rest laid on the grid."""
    return _tokens_to_maps(tensor[:, 1:, :], height, width)


def swinT_reshape_transform(tensor: Tensor, height: int = 7, width: int = 7) -> Tensor:
    """Swin tokens ``(N, h*w, C)`` or a channels-last grid ``(N, h, w, C)`` -> ``(N, C, h, w)``."""
    return _tokens_to_maps(tensor.reshape(tensor.shape[0], -1, tensor.shape[-1]), height, width)


def fasterrcnn_reshape_transform(x: Mapping[str, Tensor]) -> Tensor:
    """A feature pyramid ``{name: (N, C_l, h_l, w_l)}`` -> ``(N, sum C_l, h, w)``: the absolute
    value of every level resized bilinearly (half-pixel centres) to the ``"pool"`` level's size,
    concatenated along channels in the mapping's order."""
    if "pool" not in x:
        raise ValueError(f"x: expected a feature pyramid with a 'pool' level, got keys {list(x)}")
    size = tuple(x["pool"].shape[-2:])
    levels = [
        F.interpolate(value.abs(), size=size, mode="bilinear", align_corners=False)
        for value in x.values()
    ]
    return torch.cat(levels, dim=1)


__all__ = ["fasterrcnn_reshape_transform", "swinT_reshape_transform", "vit_reshape_transform"]
