"""ROAD: Remove And Debias (Rong et al., 2022), as pytorch-grad-cam's ``metrics.road``.

Removed pixels are filled by the noisy linear imputation of the paper (Sec. 4): each is the
weighted mean of its eight neighbours (the linear system solved in torch by conjugate gradients,
no SciPy) plus Gaussian noise of standard deviation ``noise``. The noise is drawn from torch's
global CPU generator in pytorch-grad-cam's order and layout, so ``torch.manual_seed`` gives the
same perturbed images and scores in both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastxai.compat.metrics._linear_infill import linear_infill
from fastxai.compat.metrics.perturbation_confidence import (
    AveragerAcrossThresholds,
    PerturbationConfidenceMetric,
    RemoveLeastRelevantFirst,
    RemoveMostRelevantFirst,
)

DEFAULT_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


class NoisyLinearImputer:
    """``imputer(img (C, H, W), mask (H, W))``: the pixels where ``mask`` is 0 replaced by their
    linear infill plus :math:`\\mathcal{N}(0, \\mathrm{noise}^2)` per channel."""

    def __init__(self, noise: float = 0.01, weighting: object = None) -> None:
        # pytorch-grad-cam accepts ``weighting`` but always uses the fixed neighbour weights
        self.noise = noise

    def __call__(self, img: Tensor, mask: Tensor) -> Tensor:
        return self.impute_batch(img[None], mask[None])[0]

    def impute_batch(self, images: Tensor, masks: Tensor) -> Tensor:
        """Every image solved at once; the noise drawn image by image, as one call per image
        would draw it."""
        known = masks.to(images.device) != 0
        solved = linear_infill(images, known)
        filled = images.clone()
        for image, missing, solution in zip(filled, ~known, solved, strict=True):
            # (channels, pixels) float32 on the CPU: the layout pytorch-grad-cam draws its noise in
            values = solution[:, missing].float().cpu().contiguous()
            values = values + self.noise * torch.randn_like(values)
            image[:, missing] = values.to(image.device, image.dtype)
        return filled


class ROADMostRelevantFirst(PerturbationConfidenceMetric):
    """Score change when the pixels above the ``percentile``-th percentile of the map are
    imputed."""

    def __init__(self, percentile: float | str = 80) -> None:
        super().__init__(RemoveMostRelevantFirst(percentile, NoisyLinearImputer()))


class ROADLeastRelevantFirst(PerturbationConfidenceMetric):
    """Score change when the pixels below the ``(100 - percentile)``-th percentile of the map are
    imputed."""

    def __init__(self, percentile: float | str = 20) -> None:
        super().__init__(RemoveLeastRelevantFirst(percentile, NoisyLinearImputer()))


class ROADMostRelevantFirstAverage(AveragerAcrossThresholds):
    def __init__(self, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> None:
        super().__init__(ROADMostRelevantFirst, percentiles)


class ROADLeastRelevantFirstAverage(AveragerAcrossThresholds):
    def __init__(self, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> None:
        super().__init__(ROADLeastRelevantFirst, percentiles)


class ROADCombined:
    """:math:`(\\overline{\\Delta}_{\\mathrm{LeRF}} - \\overline{\\Delta}_{\\mathrm{MoRF}}) / 2`,
    the mean score changes over ``percentiles`` (least relevant first is computed first)."""

    def __init__(self, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> None:
        self.percentiles = percentiles
        self.morf_averager = ROADMostRelevantFirstAverage(percentiles)
        self.lerf_averager = ROADLeastRelevantFirstAverage(percentiles)

    def __call__(
        self,
        input_tensor: Tensor,
        cams: np.ndarray,
        targets: Sequence[Callable],
        model: nn.Module,
    ) -> np.ndarray:
        scores_lerf = self.lerf_averager(input_tensor, cams, targets, model)
        scores_morf = self.morf_averager(input_tensor, cams, targets, model)
        return (scores_lerf - scores_morf) / 2
