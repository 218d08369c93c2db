"""pytorch-grad-cam's perturbation metrics: the change of the target score when the image is
perturbed according to its map, and the perturbations that remove the most / least relevant
pixels (by a percentile of the map, or Otsu's threshold with ``"auto"``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastxai._modes import buffers_kept
from fastxai.compat.metrics._otsu import otsu_foreground

Perturbation = Callable[[Tensor, Tensor], Tensor]


def _per_image_targets(targets: Any, n: int) -> list[Callable]:
    if not isinstance(targets, (list, tuple)) or not all(callable(t) for t in targets):
        raise TypeError(
            "targets: expected a list of callables (e.g. ClassifierOutputTarget), one per image"
        )
    if len(targets) == 1:
        return list(targets) * n
    if len(targets) != n:
        raise ValueError(f"targets: expected 1 or {n} targets (one per image), got {len(targets)}")
    return list(targets)


def _check_call(input_tensor: Any, cams: Any, model: Any) -> np.ndarray:
    if not isinstance(input_tensor, Tensor) or input_tensor.dim() != 4:
        raise TypeError("input_tensor must be a torch.Tensor of shape (N, C, H, W)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cams = np.asarray(cams)
    n, _, h, w = input_tensor.shape
    if cams.shape != (n, h, w):
        raise ValueError(f"cams must have shape (N, H, W) = {(n, h, w)}, got {cams.shape}")
    return cams


def _target_scores(targets: list[Callable], outputs: Tensor) -> np.ndarray:
    return np.float32(
        [target(output).cpu().numpy() for target, output in zip(targets, outputs, strict=True)]
    )


class PerturbationConfidenceMetric:
    """Target score of each perturbed image, minus the unperturbed score with ``return_diff``:
    :math:`s(\\mathrm{perturb}(x, M)) - s(x)`, float32 ``(N,)``.

    ``perturbation(image, cam)`` takes one image ``(C, H, W)`` and its map ``(H, W)`` (on the
    CPU) as in pytorch-grad-cam; a perturbation with a ``perturb_batch(images, cams)`` method
    (fastxai's ROAD perturbations) gets the whole batch at once. The model runs in its current
    mode without gradients; its buffers are left as they were.
    """

    def __init__(self, perturbation: Perturbation) -> None:
        self.perturbation = perturbation

    def _perturbed(self, input_tensor: Tensor, cams: np.ndarray) -> Tensor:
        batched = getattr(self.perturbation, "perturb_batch", None)
        if batched is not None:
            return batched(input_tensor, cams)
        images = [
            self.perturbation(image.cpu(), torch.from_numpy(cam)).to(input_tensor.device)
            for image, cam in zip(input_tensor, cams, strict=True)
        ]
        return torch.stack(images)

    def __call__(
        self,
        input_tensor: Tensor,
        cams: np.ndarray,
        targets: Sequence[Callable],
        model: nn.Module,
        return_visualization: bool = False,
        return_diff: bool = True,
    ) -> np.ndarray | tuple[np.ndarray, Tensor]:
        cams = _check_call(input_tensor, cams, model)
        targets = _per_image_targets(targets, input_tensor.shape[0])
        with buffers_kept(model), torch.no_grad():
            if return_diff:
                scores = _target_scores(targets, model(input_tensor))
            perturbed = self._perturbed(input_tensor, cams)
            result = _target_scores(targets, model(perturbed))
        if return_diff:
            result = result - scores
        return (result, perturbed) if return_visualization else result


class RemoveMostRelevantFirst:
    """Keeps the pixels whose map value is below the ``percentile``-th percentile (or not above
    Otsu's threshold of the 8-bit map with ``"auto"``) and lets ``imputer(image, mask)`` fill the
    others (``mask`` is 0 where a pixel is to be filled)."""

    def __init__(self, percentile: float | str, imputer: Callable[[Tensor, Tensor], Tensor]):
        if percentile != "auto" and not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be in [0, 100] or 'auto', got {percentile!r}")
        self.percentile = percentile
        self.imputer = imputer

    def _relevance(self, cam: np.ndarray) -> np.ndarray:
        return cam

    def keep_mask(self, cam: np.ndarray) -> np.ndarray:
        """``(H, W)``: nonzero where the pixel is kept."""
        relevance = self._relevance(np.asarray(cam, dtype=np.float32))
        if self.percentile == "auto":
            return otsu_foreground(np.uint8(relevance * 255))
        return np.float32(relevance < np.percentile(relevance, self.percentile))

    def __call__(self, input_tensor: Tensor, mask: Tensor) -> Tensor:
        keep = torch.from_numpy(self.keep_mask(mask.cpu().numpy())).to(mask.device)
        return self.imputer(input_tensor, keep)

    def perturb_batch(self, images: Tensor, cams: np.ndarray) -> Tensor:
        """Every image at once where the imputer has ``impute_batch``, else one by one."""
        keep = torch.from_numpy(np.stack([self.keep_mask(cam) for cam in cams]))
        batched = getattr(self.imputer, "impute_batch", None)
        if batched is not None:
            return batched(images, keep.to(images.device))
        return torch.stack(
            [
                self.imputer(image.cpu(), k).to(images.device)
                for image, k in zip(images, keep, strict=True)
            ]
        )


class RemoveLeastRelevantFirst(RemoveMostRelevantFirst):
    """:class:`RemoveMostRelevantFirst` on ``1 - cam``: removes the least relevant pixels."""

    def _relevance(self, cam: np.ndarray) -> np.ndarray:
        return 1 - cam


class AveragerAcrossThresholds:
    """Mean over ``percentiles`` of ``imputer(percentile)(input_tensor, cams, targets, model)``."""

    def __init__(
        self,
        imputer: Callable[[float], Callable[..., np.ndarray]],
        percentiles: Sequence[float] = (10, 20, 30, 40, 50, 60, 70, 80, 90),
    ) -> None:
        self.imputer = imputer
        self.percentiles = list(percentiles)

    def __call__(
        self,
        input_tensor: Tensor,
        cams: np.ndarray,
        targets: Sequence[Callable],
        model: nn.Module,
    ) -> np.ndarray:
        scores = [
            self.imputer(percentile)(input_tensor, cams, targets, model)
            for percentile in self.percentiles
        ]
        return np.mean(np.float32(scores), axis=0)
