"""pytorch-grad-cam's ``metrics.cam_mult_image``: the image multiplied by its map."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from fastxai.compat.metrics.perturbation_confidence import PerturbationConfidenceMetric


def multiply_tensor_with_cam(input_tensor: Tensor, cam: Tensor) -> Tensor:
    """:math:`x \\odot M` (the normalised image times the map, broadcast over channels)."""
    return input_tensor * cam


class CamMultImageConfidenceChange(PerturbationConfidenceMetric):
    """:math:`s(x \\odot M) - s(x)` per image."""

    def __init__(self) -> None:
        super().__init__(multiply_tensor_with_cam)


class DropInConfidence(CamMultImageConfidenceChange):
    """:math:`\\max(s(x) - s(x \\odot M), 0)` per image (unnormalised, as pytorch-grad-cam)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        scores = super().__call__(*args, **kwargs)
        if isinstance(scores, tuple):
            return np.maximum(-scores[0], 0), scores[1]
        return np.maximum(-scores, 0)


class IncreaseInConfidence(CamMultImageConfidenceChange):
    """1 where :math:`s(x \\odot M) > s(x)`, else 0, per image (float32)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        scores = super().__call__(*args, **kwargs)
        if isinstance(scores, tuple):
            return np.float32(scores[0] > 0), scores[1]
        return np.float32(scores > 0)
