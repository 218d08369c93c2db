"""Faithfulness metrics on any saliency maps: Average Increase / Drop, deletion / insertion AUC.

All of them are batched: the perturbed images of every image run through the model together, in
chunks under a memory bound, under inference mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fastxai._batching import class_probabilities
from fastxai._checks import check_images, check_maps, check_model
from fastxai._modes import keeps_buffers
from fastxai.targets import resolve_targets


def _classes(model: nn.Module, x: Tensor, targets: object) -> tuple[Tensor, Tensor]:
    with torch.inference_mode():
        logits = model(x)
    resolved = resolve_targets(targets, logits)
    if resolved.callables is not None:
        raise ValueError("targets: metrics need class indices (they compare probabilities)")
    probs = torch.softmax(logits.float(), dim=1).gather(1, resolved.classes[:, None])[:, 0]
    return resolved.classes, probs


@dataclass
class IncreaseDrop:
    """Per-image and averaged Average Increase / Average Drop.

    Attributes:
        increase: ``(N,)`` bool, :math:`\\hat y_c > y_c`.
        drop: ``(N,)`` :math:`\\max(y_c - \\hat y_c, 0) / y_c`.
        original: ``(N,)`` :math:`y_c`; masked: ``(N,)`` :math:`\\hat y_c`.
    """

    increase: Tensor
    drop: Tensor
    original: Tensor
    masked: Tensor

    @property
    def average_increase(self) -> float:
        return float(self.increase.float().mean()) if self.increase.numel() else float("nan")

    @property
    def average_drop(self) -> float:
        return float(self.drop.mean()) if self.drop.numel() else float("nan")


@keeps_buffers
def average_increase_drop(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    targets: object = None,
    *,
    mask: Literal["binary", "soft"] = "binary",
    batch_size: int | None = None,
) -> IncreaseDrop:
    r"""Average Increase :math:`\frac1n \sum 1[\hat y_c > y_c]` and Average Drop
    :math:`\frac1n \sum \max(y_c - \hat y_c, 0) / y_c` (TFT paper §5.2), softmax probabilities.

    ``mask="binary"`` (the TFT paper): :math:`\hat x = 1[I > 0] \odot x`, so pass maps that are
    already thresholded (TFT's ``maps``, or :func:`mute_lowest` for the naive Table 1 muting).
    ``mask="soft"`` (Grad-CAM++): :math:`\hat x = I \odot x`. ``targets``: ``None`` = top-1.
    """
    check_model(model)
    check_images(model, x)
    check_maps(x, maps)
    if mask not in ("binary", "soft"):
        raise ValueError(f"mask must be 'binary' or 'soft', got {mask!r}")
    classes, original = _classes(model, x, targets)
    factor = (maps > 0).to(x.dtype) if mask == "binary" else maps.to(x.dtype)
    masked = class_probabilities(model, x * factor[:, None], classes, batch_size)
    drop = (original - masked).clamp_min(0) / original
    return IncreaseDrop(masked > original, drop, original, masked)


def mute_lowest(maps: Tensor, fraction: float) -> Tensor:
    """Zero the lowest ``floor(fraction * H * W)`` pixels of each map (stable ties)."""
    from fastxai.thresholding import percentile_masks

    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    keep = percentile_masks(maps, torch.tensor([fraction], device=maps.device))[:, 0]
    return maps * keep


@dataclass
class DeletionInsertion:
    """Deletion and insertion curves ``(N, steps + 1)`` and their areas ``(N,)``."""

    deletion: Tensor
    insertion: Tensor
    deletion_auc: Tensor
    insertion_auc: Tensor


@keeps_buffers
def deletion_insertion(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    targets: object = None,
    *,
    steps: int = 20,
    baseline: float | Tensor = 0.0,
    batch_size: int | None = None,
) -> DeletionInsertion:
    r"""Deletion and insertion (Petsiuk et al., RISE): pixels in decreasing saliency order
    (stable ties) are replaced by ``baseline`` (deletion) or revealed on it (insertion) in
    ``steps`` equal steps; the curve is the class probability after :math:`s` steps
    (:math:`\lceil s\,HW/\mathrm{steps} \rceil` pixels), the score its trapezoidal area on [0, 1].
    Lower deletion and higher insertion areas mean a more faithful map.
    """
    check_model(model)
    check_images(model, x)
    check_maps(x, maps)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps}")
    n, c, h, w = x.shape
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)
    classes, _ = _classes(model, x, targets)
    order = torch.sort(maps.flatten(1), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=x.device).expand(n, -1))
    counts = torch.ceil(torch.arange(steps + 1, device=x.device) * (h * w) / steps).long()
    revealed = (rank[:, None, :] < counts[None, :, None]).view(n, steps + 1, 1, h, w)
    revealed = revealed.to(x.dtype)
    deleted_images = x[:, None] * (1 - revealed) + base[:, None] * revealed
    inserted_images = base[:, None] * (1 - revealed) + x[:, None] * revealed
    per_row = classes.repeat_interleave(steps + 1)
    deletion = class_probabilities(
        model, deleted_images.reshape(-1, c, h, w), per_row, batch_size
    ).view(n, steps + 1)
    insertion = class_probabilities(
        model, inserted_images.reshape(-1, c, h, w), per_row, batch_size
    ).view(n, steps + 1)
    grid = torch.linspace(0, 1, steps + 1, device=x.device)
    return DeletionInsertion(
        deletion,
        insertion,
        torch.trapezoid(deletion, grid, dim=1),
        torch.trapezoid(insertion, grid, dim=1),
    )
