"""Finer-CAM (Zhang et al., 2025): explain a class against the classes scored most like it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from torch import Tensor, nn

from fastxai.capture import ReshapeTransform
from fastxai.compat._base import BaseCAM, WrappingCAM
from fastxai.compat.cams import GradCAM
from fastxai.compat.utils.model_targets import FinerWeightedTarget
from fastxai.methods._projection import SvdSign

DEFAULT_COMPARISON_CATEGORIES = (1, 2, 3)


class _NearestClassesTarget:
    r"""Finer-CAM's default target for one image, chosen from that image's output :math:`z`.

    Classes are ranked by :math:`|z_j - z_t|` ascending, :math:`z_t` the top logit (or class
    ``target_idx``'s); the first ranked is explained against the ranks in
    ``comparison_categories`` through :class:`FinerWeightedTarget`.
    """

    def __init__(
        self, alpha: float, comparison_categories: Sequence[int] | None, target_idx: int | None
    ) -> None:
        self.alpha = alpha
        self.comparison_categories = comparison_categories
        self.target_idx = target_idx

    def __call__(self, model_output: Tensor) -> Tensor:
        scores = model_output.detach().cpu().numpy()
        num_classes = scores.shape[-1]
        if self.comparison_categories is None:
            ranks = list(DEFAULT_COMPARISON_CATEGORIES[: max(num_classes - 1, 0)])
        else:
            ranks = [r for r in self.comparison_categories if r < num_classes]
        anchor = scores.max() if self.target_idx is None else scores[self.target_idx]
        order = np.argsort(np.abs(scores - anchor))
        target = FinerWeightedTarget(int(order[0]), [int(order[r]) for r in ranks], self.alpha)
        return target(model_output)


class FinerCAM(WrappingCAM):
    """Runs ``base_method`` (a compat CAM class) with Finer-CAM's targets."""

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform | None = None,
        base_method: type[BaseCAM] = GradCAM,
        *,
        svd_sign: SvdSign = "largest_positive",
    ) -> None:
        self.base_cam = base_method(model, target_layers, reshape_transform, svd_sign=svd_sign)
        self.compute_input_gradient = self.base_cam.compute_input_gradient
        self.uses_gradients = self.base_cam.uses_gradients

    def forward(
        self,
        input_tensor: Tensor,
        targets: Sequence[Callable] | None = None,
        eigen_smooth: bool = False,
        alpha: float = 1,
        comparison_categories: Sequence[int] | None = None,
        target_idx: int | None = None,
    ) -> np.ndarray:
        """Maps ``(N, H, W)``. Without ``targets`` each image's class ranked first (its top class,
        or ``target_idx``) is explained against the classes ranked ``comparison_categories``
        (default 1, 2, 3) by :math:`|z_j - z_t|`, weighted by ``alpha``."""
        if targets is None:
            chosen = _NearestClassesTarget(alpha, comparison_categories, target_idx)
            targets = [chosen] * input_tensor.shape[0]
        return self.base_cam(input_tensor, targets, eigen_smooth=eigen_smooth)
