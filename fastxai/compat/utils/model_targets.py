"""What to explain, as pytorch-grad-cam's target classes (same names, arguments and scores).

Each target is called on one image's model output and returns the score whose gradient the CAM
methods follow: ``from fastxai.compat.utils.model_targets import ClassifierOutputTarget`` in
place of ``from pytorch_grad_cam.utils.model_targets import ...``. pytorch-grad-cam's own objects
keep working in fastxai too; :class:`ClassifierOutputTarget` (theirs or this one) is read as the
class index it names, so the fast path (one gather) applies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _pick(output: Tensor, category: int) -> Tensor:
    return output[category] if output.dim() == 1 else output[:, category]


class ClassifierOutputTarget:
    """The logit of class ``category``: :math:`z_c`."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: Tensor) -> Tensor:
        return _pick(model_output, self.category)


class ClassifierOutputSoftmaxTarget:
    """The softmax probability of class ``category``: :math:`e^{z_c} / \\sum_j e^{z_j}`."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: Tensor) -> Tensor:
        return _pick(torch.softmax(model_output, dim=-1), self.category)


class ClassifierOutputReST:
    """The logit minus the cross-entropy of class ``category``, :math:`z_c + \\log p_c`
    (pre- and post-softmax together; Sun et al., 2025, arXiv:2501.06261)."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: Tensor) -> Tensor:
        rows = model_output[None] if model_output.dim() == 1 else model_output
        labels = torch.full((rows.shape[0],), self.category, device=rows.device)
        score = _pick(rows, self.category) - F.cross_entropy(rows, labels, reduction="none")
        return score[0] if model_output.dim() == 1 else score


class BinaryClassifierOutputTarget:
    """A binary classifier's single output, for class 1, or its negation, for class 0."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: Tensor) -> Tensor:
        return model_output if self.category == 1 else -model_output


class SemanticSegmentationTarget:
    """A segmentation model's scores for class ``category`` summed over ``mask`` ``(H, W)``:
    :math:`\\sum_{ij} S_{c,ij}\\, m_{ij}` of one image's output ``(K, H, W)``."""

    def __init__(self, category: int, mask: np.ndarray | Tensor) -> None:
        self.category = category
        self.mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask)

    def __call__(self, model_output: Tensor) -> Tensor:
        mask = self.mask.to(device=model_output.device, dtype=model_output.dtype)
        return (model_output[self.category] * mask).sum()


class SoftmaxOutputTarget:
    """Every class's softmax probability (fastxai sums them, which is 1: use it for methods
    without gradients)."""

    def __call__(self, model_output: Tensor) -> Tensor:
        return torch.softmax(model_output, dim=-1)


class FinerWeightedTarget:
    r"""Finer-CAM's score: class ``main_category`` against ``comparison_categories``,
    :math:`\sum_j p_j (z_m - \alpha z_j) / (\sum_j p_j + 10^{-9})` with :math:`p` the softmax
    of the output."""

    def __init__(
        self, main_category: int, comparison_categories: Sequence[int], alpha: float
    ) -> None:
        self.main_category = main_category
        self.comparison_categories = list(comparison_categories)
        self.alpha = alpha

    def __call__(self, model_output: Tensor) -> Tensor:
        probabilities = torch.softmax(model_output, dim=-1)
        main = _pick(model_output, self.main_category)
        numerator = main * 0
        denominator = main * 0
        for j in self.comparison_categories:
            weight = _pick(probabilities, j)
            numerator = numerator + weight * (main - self.alpha * _pick(model_output, j))
            denominator = denominator + weight
        return numerator / (denominator + 1e-9)


class RawScoresOutputTarget:
    """The whole output (fastxai sums it: the score is :math:`\\sum_j z_j`)."""

    def __call__(self, model_output: Tensor) -> Tensor:
        return model_output


class FasterRCNNBoxScoreTarget:
    """For each reference box (``labels``, ``bounding_boxes`` ``(B, 4)``), the detection that
    overlaps it most: its IoU plus its score when the IoU exceeds ``iou_threshold`` and the label
    is the same, else 0; summed. Called on one image's detections, a dict with ``boxes``,
    ``labels`` and ``scores``."""

    def __init__(
        self,
        labels: Sequence[int],
        bounding_boxes: np.ndarray | Tensor,
        iou_threshold: float = 0.5,
    ) -> None:
        self.labels = list(labels)
        self.bounding_boxes = bounding_boxes
        self.iou_threshold = iou_threshold

    def __call__(self, model_outputs: dict[str, Tensor]) -> Tensor:
        from torchvision.ops import box_iou

        boxes, scores = model_outputs["boxes"], model_outputs["scores"]
        total = scores.sum() * 0  # stays in the graph when nothing matches
        if boxes.numel() == 0:
            return total
        references = torch.as_tensor(self.bounding_boxes, device=boxes.device).to(boxes.dtype)
        for box, label in zip(references.reshape(-1, 4), self.labels, strict=True):
            iou = box_iou(box[None], boxes)[0]
            best = int(iou.argmax())
            if iou[best] > self.iou_threshold and int(model_outputs["labels"][best]) == label:
                total = total + iou[best] + scores[best]
        return total
