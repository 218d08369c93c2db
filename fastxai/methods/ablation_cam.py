"""Ablation-CAM (Desai and Ramaswamy, 2020), re-running only the network after the layer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fastxai._batching import no_autograd, rows_per_batch
from fastxai.capture import LayerCapture
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


def ablation_scores(
    cap: LayerCapture,
    batch_size: int | None = None,
    channel_axis: int | None = None,
    select_channels: ChannelSelection | None = None,
) -> Tensor:
    """Target score :math:`y_k` of every image with each channel ``k`` of the layer set to 0.

    Only the network after the layer runs: row ``(n, k)`` is image ``n``'s activation with
    channel ``k`` zeroed, batched over images and channels. With ``select_channels`` only the
    channels it picks are ablated; the others keep the unablated score :math:`y`.
    Returns ``(N, C)``.
    """
    if cap.split is None:
        raise ValueError(
            "layer: Ablation-CAM re-runs the network after the layer, which needs a model that "
            "torch.fx can trace"
        )
    a = cap.raw_activation
    axis = channel_axis_of(cap, channel_axis)
    n, c = a.shape[0], a.shape[axis]
    for carried in cap.carry:
        if not isinstance(carried, Tensor) or carried.shape[:1] != (n,):
            raise ValueError(
                "layer: the network after this layer reads a value without a batch dimension "
                f"({type(carried).__name__}); choose another layer for Ablation-CAM"
            )
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
    rows = rows_per_batch(a, batch_size)
    with no_autograd():
        # One buffer for every chunk's ablated copies: a fresh allocation per chunk costs page
        # faults comparable to the suffix itself at small layers.
        buffer = a.new_empty((max(1, min(rows, len(images))), *a.shape[1:]))
        for start in range(0, len(images), rows):
            image, channel = images[start : start + rows], channels[start : start + rows]
            ablated = torch.index_select(a, 0, image, out=buffer[: len(image)])
            ablated.movedim(axis, 1)[torch.arange(len(image), device=a.device), channel] = 0
            logits = cap.split.suffix_on_owned(ablated, *[t[image] for t in cap.carry])
            scores[image, channel] = cap.targets.scores(logits, image).to(dtype)
    return scores


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
    weights = (y - ablation_scores(cap, batch_size, channel_axis, select_channels)) / y
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
    batched over images and channels (``batch_size=`` rows per run, default by memory).
    With ``reshape_transform`` (e.g. ViT tokens ``(N, T, C)``) the channel is zeroed at every
    token of the layer output; ``channel_axis=`` names the layer output's channel axis where the
    default (1 without a transform, else the last) does not hold it. ``select_channels=``, a
    function from the activation ``(N, C, h, w)`` to ``(N, K)`` channel indices, restricts the
    ablation to those channels (the others weigh 0).""",
)
