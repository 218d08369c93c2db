"""pytorch-grad-cam's ``metrics.arcc``: Complexity, Coherency and their harmonic mean with ROAD
(Poppi et al., 2021, Sec. 3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastxai.compat.metrics.road import ROADCombined

_EPSILON = 1e-8


def batch_pearson_coherency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of maps: :math:`\\mathrm{cov}(a, b) / (\\sigma_a
    \\sigma_b + 10^{-8})`, ``(N,)``."""
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    a_centred = a - a.mean(axis=1, keepdims=True)
    b_centred = b - b.mean(axis=1, keepdims=True)
    dof = a.shape[1] - 1
    covariance = (a_centred * b_centred).sum(axis=1) / dof
    std_a = np.sqrt((a_centred**2).sum(axis=1) / dof)
    std_b = np.sqrt((b_centred**2).sum(axis=1) / dof)
    return covariance / (std_a * std_b + _EPSILON)


class Complexity:
    """Mean absolute map value :math:`\\|M\\|_1 / HW` per image."""

    def __call__(self, grayscale_cams: np.ndarray) -> np.ndarray:
        flat = grayscale_cams.reshape(grayscale_cams.shape[0], -1)
        return np.sum(np.abs(flat), axis=1) / flat.shape[1]


class Coherency:
    """:math:`(\\rho(M(x \\odot M), M) + 1) / 2`: the correlation of the map with the map that
    ``base_method`` gives for the image multiplied by it, moved to [0, 1]."""

    def __call__(
        self,
        input_tensor: Tensor,
        grayscale_cams: np.ndarray,
        targets: Sequence[Callable],
        model: nn.Module,
        base_method: Callable[..., np.ndarray],
    ) -> np.ndarray:
        cams = torch.from_numpy(grayscale_cams).unsqueeze(1).to(input_tensor.device)
        mixed_cams = base_method(input_tensor=input_tensor * cams, targets=targets)
        return (batch_pearson_coherency(mixed_cams, grayscale_cams) + 1) / 2


class ARCC:
    """Harmonic mean of Coherency, 1 - Complexity and ROAD (:class:`ROADCombined` doubled and
    clipped to [0, 1]), each with :math:`10^{-8}` added."""

    def __init__(
        self,
        base_method: Callable[..., np.ndarray],
        road_percentiles: Sequence[float] = (20, 40, 60, 80),
    ) -> None:
        self.complexity = Complexity()
        self.coherency = Coherency()
        self.road = ROADCombined(percentiles=road_percentiles)
        self.base_method = base_method

    def __call__(
        self,
        input_tensor: Tensor,
        grayscale_cams: np.ndarray,
        targets: Sequence[Callable],
        model: nn.Module,
    ) -> np.ndarray:
        complexity = self.complexity(grayscale_cams)
        coherency = self.coherency(input_tensor, grayscale_cams, targets, model, self.base_method)
        road = (self.road(input_tensor, grayscale_cams, targets, model) * 2).clip(0, 1)
        inverse = (
            1 / (coherency + _EPSILON) + 1 / ((1 - complexity) + _EPSILON) + 1 / (road + _EPSILON)
        )
        return 3 * inverse ** (-1)
