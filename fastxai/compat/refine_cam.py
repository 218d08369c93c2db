"""pytorch-grad-cam's ``RefineCAM``: the product of one CAM per layer.

Each layer's map (already in [0, 1]) multiplies the others, so what survives is where every
layer agrees; an early layer's detail is kept where the deeper layers see the object. The
product is min-max scaled per image, as pytorch-grad-cam scales it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn

from fastxai.capture import ReshapeTransform
from fastxai.compat._base import BaseCAM, WrappingCAM
from fastxai.compat.cams import GradCAMPlusPlus
from fastxai.compat.utils.image import scale_cam_image


class RefineCAM(WrappingCAM):
    """``RefineCAM(model, target_layers, reshape_transform=None, base_method=GradCAMPlusPlus,
    **kwargs)(input_tensor, targets=None, eigen_smooth=False)``: one ``base_method`` (a
    :mod:`fastxai.compat` class, constructed with ``kwargs``) per layer, and the min-max scaled
    product of their maps, float32 ``(N, H, W)``. ``eigen_smooth`` goes to every layer's CAM
    (pytorch-grad-cam passes it in the place of ``aug_smooth``)."""

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform | None = None,
        base_method: type[BaseCAM] = GradCAMPlusPlus,
        **kwargs: Any,
    ) -> None:
        if not isinstance(target_layers, (list, tuple)) or not target_layers:
            raise ValueError("target_layers must be a non-empty list of modules")
        self.base_cam_per_layer = [
            base_method(model, [layer], reshape_transform, **kwargs) for layer in target_layers
        ]

    def forward(
        self,
        input_tensor: Tensor,
        targets: Sequence[Callable] | None = None,
        eigen_smooth: bool = False,
    ) -> np.ndarray:
        maps = [
            cam(input_tensor, targets, eigen_smooth=eigen_smooth) for cam in self.base_cam_per_layer
        ]
        return scale_cam_image(np.prod(np.stack(maps), axis=0))

    def wrapped_cams(self) -> list[BaseCAM]:
        return self.base_cam_per_layer
