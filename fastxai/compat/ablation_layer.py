"""pytorch-grad-cam's ablation layers, as the names ``AblationCAM(ablation_layer=...)`` takes.

fastxai swaps no layer: Ablation-CAM zeroes channels of the captured layer output and re-runs
the network after it (or the whole model with the layer's output replaced for the call). The
objects here (or pytorch-grad-cam's, recognised by class name) only say where the channels are:
:class:`AblationLayer` on axis 1 of ``(N, C, h, w)`` outputs, :class:`AblationLayerVit` on the
last axis of token outputs ``(N, T, C)`` (each channel zeroed at every token),
:class:`AblationLayerFasterRCNN` across the levels of a detector's feature pyramid. Their
``activations_to_be_ablated`` is pytorch-grad-cam's channel selection for
``ratio_channels_to_ablate``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fastxai.methods._projection import first_component_projection

# pytorch-grad-cam's threshold on the min-max scaled |first principal component|
_OBJECT_THRESHOLD = 0.01


def objectness_mask(activations: Tensor) -> Tensor:
    """``(N, h, w)`` bool: where :math:`|P|`, the first principal component of the channel
    vectors min-max scaled, exceeds 0.01 (the positions worth ablating for)."""
    projection = first_component_projection(activations.float()).abs()
    low = projection.amin((1, 2), keepdim=True)
    high = (projection - low).amax((1, 2), keepdim=True)
    return (projection - low) / high > _OBJECT_THRESHOLD


def channels_to_ablate(activations: Tensor, ratio: float) -> Tensor:
    r"""``(N, K)`` channel indices: per image, the ``k = int(C r)`` channels with the highest
    and the ``k`` with the lowest share :math:`\sum P \hat A_c / \sum \hat A_c` inside the
    objectness mask :math:`P` (:math:`\hat A_c`: :math:`|A_c|` min-max scaled); every channel
    for ``r = 1`` or where the two sets would overlap (``r > 0.5``).

    The shares are computed in float32 NumPy and ranked by NumPy's default sort, as in
    pytorch-grad-cam: many channels share exactly 1 (their minimum lies outside the mask), and
    that sort's order among equal shares decides which of them are ablated. Undefined shares
    (constant :math:`|A_c|`) rank highest.
    """
    n, c = activations.shape[:2]
    k = int(c * ratio)
    if ratio == 1.0 or 2 * k > c:
        return torch.arange(c, device=activations.device).repeat(n, 1)
    masks = objectness_mask(activations).cpu().numpy()
    chosen = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for mask, image in zip(masks, activations.float().cpu().numpy(), strict=True):
            magnitude = np.abs(image)
            magnitude = magnitude - magnitude.min(axis=(1, 2), keepdims=True)
            magnitude = magnitude / magnitude.max(axis=(1, 2), keepdims=True)
            # one channel at a time: NumPy's summation order, so equal shares stay equal
            share = np.float32([(mask * m).sum() / m.sum() for m in magnitude])
            order = np.argsort(share)
            chosen.append(np.concatenate([order[::-1][:k], order[:k]]))
    return torch.as_tensor(np.stack(chosen), device=activations.device)


class AblationLayer:
    """Channels on axis 1 of the layer output ``(N, C, h, w)``."""

    channel_axis: int | None = 1

    def activations_to_be_ablated(
        self, activations: np.ndarray, ratio_channels_to_ablate: float = 1.0
    ) -> np.ndarray:
        """pytorch-grad-cam's selection for one image's activation ``(C, h, w)``: int32
        indices, the most then the least object-covering channels."""
        chosen = channels_to_ablate(torch.as_tensor(activations)[None], ratio_channels_to_ablate)
        return chosen[0].numpy().astype(np.int32)


class AblationLayerVit(AblationLayer):
    """Channels on the last axis of token outputs ``(N, T, C)``, zeroed at every token."""

    channel_axis = -1


class AblationLayerFasterRCNN(AblationLayer):
    """A detector's feature pyramid (a dict of maps): channel ``k`` of the concatenated levels
    is set to -1000, as in pytorch-grad-cam (see :mod:`fastxai.compat.pyramid_ablation`)."""

    channel_axis = None
