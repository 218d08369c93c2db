"""Ablation-CAM (Desai and Ramaswamy, 2020), re-running the network after the layer (or, where
it cannot run on its own, the whole model with the layer's output replaced)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fastxai._batching import no_autograd, rows_per_batch
from fastxai.capture import LayerCapture, split_layer_ref
from fastxai.layer_substitution import output_substituted
from fastxai.methods._base import make_cam_method

# (activation (N, C, h, w)) -> the channels to ablate in each image, (N, K) indices
ChannelSelection = Callable[[Tensor], Tensor]


def channel_axis_of(cap: LayerCapture, channel_axis: int | None = None) -> int:
    """The axis of the layer output that holds the ``C`` channels of the (reshaped) activation.

    ``None`` chooses it: axis 1 where ``reshape_transform`` keeps the shape, else the last axis
    (token outputs ``(N, T, C)`` and channels-last grids keep channels there; a channel is then
    ablated at every token, the class token included).
    """
    raw, c = cap.raw_activation, cap.activation.shape[1]
    if channel_axis is None:
        channel_axis = 1 if raw.shape == cap.activation.shape else raw.dim() - 1
    if not -raw.dim() <= channel_axis < raw.dim() or raw.shape[channel_axis] != c:
        raise ValueError(
            f"channel_axis: axis {channel_axis} of the layer output {tuple(raw.shape)} does not "
            f"hold the {c} channels of the reshaped activation; token outputs (N, T, C) keep "
            "their channels on the last axis"
        )
    return channel_axis % raw.dim()


def suffix_runs_alone(cap: LayerCapture) -> bool:
    """True where the network after the layer can re-run on any rows of the batch: the model was
    split at the layer and every value carried past it is a tensor with one row per image (an
    int or ``torch.Size`` computed before the layer may depend on the batch)."""
    n = cap.raw_activation.shape[0]
    return cap.split is not None and all(
        isinstance(carried, Tensor) and carried.shape[:1] == (n,) for carried in cap.carry
    )


def ablation_scores(
    cap: LayerCapture,
    model: nn.Module,
    x: Tensor,
    batch_size: int | None = None,
    channel_axis: int | None = None,
    select_channels: ChannelSelection | None = None,
) -> Tensor:
    """Target score :math:`y_k` of every image with each channel ``k`` of the layer set to 0.

    Row ``(n, k)`` is image ``n``'s activation with channel ``k`` zeroed, batched over images
    and channels. Only the network after the layer runs where it can run on its own
    (:func:`suffix_runs_alone`); otherwise the whole model runs on the batch's images with the
    layer's output replaced by the ablated rows (:mod:`fastxai.layer_substitution`). With
    ``select_channels`` only the channels it picks are ablated; the others keep the unablated
    score :math:`y`. Returns ``(N, C)``.
    """
    a = cap.raw_activation
    if not isinstance(a, Tensor):
        raise ValueError(
            f"layer {cap.layer!r}: Ablation-CAM zeroes channels of a layer that yields a tensor, "
            f"this one yields {type(a).__name__} (a detector's feature pyramid is ablated by "
            "fastxai.compat.AblationCAM with AblationLayerFasterRCNN)"
        )
    axis = channel_axis_of(cap, channel_axis)
    n, c = a.shape[0], a.shape[axis]
    # float32 even when the network runs in bfloat16/float16: y - y_k cancels digits.
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    scores = cap.targets.scores(cap.logits).detach().to(dtype)[:, None].repeat(1, c)
    if select_channels is None:
        images = torch.arange(n, device=a.device).repeat_interleave(c)
        channels = torch.arange(c, device=a.device).repeat(n)
    else:
        chosen = select_channels(cap.activation).to(a.device, torch.long)
        images = torch.arange(n, device=a.device).repeat_interleave(chosen.shape[1])
        channels = chosen.flatten()
    if suffix_runs_alone(cap):
        split, carry = cap.split, cap.carry
        with no_autograd():
            _score_ablated_rows(
                cap,
                scores,
                images,
                channels,
                axis,
                rows_per_batch(a, batch_size),
                lambda ablated, image: split.suffix_on_owned(ablated, *[t[image] for t in carry]),
            )
        return scores
    name, call_index = split_layer_ref(cap.layer)
    # the whole model runs: its rows are at least as large as the input's
    rows = rows_per_batch(a if a[0].numel() >= x[0].numel() else x, batch_size)
    layer = model.get_submodule(name)
    with output_substituted(model, layer, call_index) as substitution, no_autograd():
        _score_ablated_rows(
            cap,
            scores,
            images,
            channels,
            axis,
            rows,
            lambda ablated, image: substitution.run(x[image], ablated),
        )
    return scores


def _score_ablated_rows(
    cap: LayerCapture,
    scores: Tensor,
    images: Tensor,
    channels: Tensor,
    axis: int,
    rows: int,
    run: Callable[[Tensor, Tensor], Any],
) -> None:
    """Writes ``scores[images[i], channels[i]]``: the target score of ``run(ablated, image)``,
    the model's output for the layer outputs ``ablated`` of images ``image``, ``rows`` a run."""
    a = cap.raw_activation
    # One buffer for every chunk's ablated copies: a fresh allocation per chunk costs page
    # faults comparable to the suffix itself at small layers.
    buffer = a.new_empty((max(1, min(rows, len(images))), *a.shape[1:]))
    for start in range(0, len(images), rows):
        image, channel = images[start : start + rows], channels[start : start + rows]
        ablated = torch.index_select(a, 0, image, out=buffer[: len(image)])
        ablated.movedim(axis, 1)[torch.arange(len(image), device=a.device), channel] = 0
        scores[image, channel] = cap.targets.scores(run(ablated, image), image).to(scores.dtype)


def ablationcam_contributions(
    cap: LayerCapture,
    model: nn.Module,
    x: Tensor,
    batch_size: int | None = None,
    channel_axis: int | None = None,
    select_channels: ChannelSelection | None = None,
) -> tuple[Tensor, Tensor]:
    r""":math:`w_k = (y - y_k) / y` with :math:`y_k` the score when channel ``k`` is zeroed;
    contributions :math:`w_k A_k`."""
    y = cap.targets.scores(cap.logits)[:, None]
    weights = (y - ablation_scores(cap, model, x, batch_size, channel_axis, select_channels)) / y
    return weights[:, :, None, None] * cap.activation, weights


ablationcam = make_cam_method(
    "ablationcam",
    ablationcam_contributions,
    with_gradient=False,
    differentiable=False,
    reruns_suffix=True,
    summary=r"""Ablation-CAM: :math:`M = \mathrm{ReLU}(\sum_k w_k A_k)` with
    :math:`w_k = (y - y_k)/y`,
    :math:`y_k` the target score with channel ``k`` of the layer set to zero (the paper's
    ablation; pytorch-grad-cam uses :math:`\min A - 10^7` instead when the layer can be negative),
    then min-max, bilinear upsampling, min-max. Only the network after the layer is re-run,
    batched over images and channels (``batch_size=`` rows per run, default by memory). Where
    that network cannot run on its own (torch.fx cannot trace the model, or it reads a
    non-tensor value computed before the layer, such as the input's size) the whole model is
    re-run instead, with a temporary forward hook replacing the layer's output by the ablated
    rows: the same scores, but the work before the layer is repeated for every row.
    With ``reshape_transform`` (e.g. ViT tokens ``(N, T, C)``) the channel is zeroed at every
    token of the layer output; ``channel_axis=`` names the layer output's channel axis where the
    default (1 without a transform, else the last) does not hold it. ``select_channels=``, a
    function from the activation ``(N, C, h, w)`` to ``(N, K)`` channel indices, restricts the
    ablation to those channels (the others weigh 0).""",
)
