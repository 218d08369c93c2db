"""Ablation-CAM of a layer that yields a dict of feature maps (a detector's feature pyramid), as
pytorch-grad-cam's ``AblationLayerFasterRCNN`` ablates it.

Channel ``k`` of the reshaped activation (the levels' channels concatenated in the dict's order,
as ``fasterrcnn_reshape_transform`` builds it) is channel ``k - offset`` of its level; ablating it
sets that channel to -1000 at every position (pytorch-grad-cam's value for these layers). The
whole model re-runs on each batch of ablated copies with the layer's output replaced
(:func:`fastxai.layer_substitution.output_substituted`); the layer itself runs on one image
only (its output is discarded).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastxai._batching import no_autograd
from fastxai.layer_substitution import output_substituted

ABLATION_VALUE = -1000.0  # pytorch-grad-cam's AblationLayerFasterRCNN
DEFAULT_ROWS = 32  # pytorch-grad-cam's AblationCAM batch_size


def captured_pyramid(
    model: nn.Module, layer: nn.Module, x: Tensor
) -> tuple[dict[str, Tensor], Any]:
    """The layer's dict of ``(N, C_l, h_l, w_l)`` maps (of the layer's own dict type) and the
    model's output, one forward."""
    kept: list[Any] = []
    handle = layer.register_forward_hook(lambda _m, _i, output: kept.append(output))
    try:
        with no_autograd():
            outputs = model(x)
    finally:
        handle.remove()
    if not kept or not isinstance(kept[0], Mapping):
        got = type(kept[0]).__name__ if kept else "nothing"
        raise ValueError(
            "ablation_layer: AblationLayerFasterRCNN ablates a layer that yields a dict of "
            f"feature maps (a detector's backbone), the target layer yields {got}"
        )
    return type(kept[0])((key, value.clone()) for key, value in kept[0].items()), outputs


def pyramid_ablation_scores(
    model: nn.Module,
    layer: nn.Module,
    x: Tensor,
    pyramid: dict[str, Tensor],
    targets: Sequence[Callable[[Any], Tensor]],
    channels: Tensor,
    batch_size: int | None = None,
) -> Tensor:
    """``(N, K)`` target scores of image ``n`` with channel ``channels[n, k]`` of the pyramid
    (numbered across its levels in order) set to -1000."""
    levels = list(pyramid)
    widths = torch.tensor([pyramid[key].shape[1] for key in levels])
    starts = torch.cumsum(widths, 0) - widths
    rows = DEFAULT_ROWS if batch_size is None else batch_size
    scores = torch.zeros(channels.shape, dtype=torch.float32)
    with (
        output_substituted(model, layer, layer_on_first_row=True) as substitution,
        no_autograd(),
    ):
        for n in range(channels.shape[0]):
            for start in range(0, channels.shape[1], rows):
                chosen = channels[n, start : start + rows].cpu()
                level = torch.searchsorted(starts, chosen, right=True) - 1
                replacement = type(pyramid)()
                for index, key in enumerate(levels):
                    copies = pyramid[key][n : n + 1].repeat(len(chosen), 1, 1, 1)
                    mine = (level == index).nonzero()[:, 0]
                    copies[mine, chosen[mine] - starts[index]] = ABLATION_VALUE
                    replacement[key] = copies
                copies_of_x = x[n : n + 1].expand(len(chosen), *x.shape[1:])
                outputs = substitution.run(copies_of_x, replacement)
                scores[n, start : start + len(chosen)] = torch.stack(
                    [targets[n](output).reshape(()).float().cpu() for output in outputs]
                )
    return scores
