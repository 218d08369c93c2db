"""Ablation-CAM (Desai and Ramaswamy, 2020), re-running only the network after the layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastxai._batching import no_autograd, rows_per_batch
from fastxai.capture import LayerCapture
from fastxai.methods._base import make_cam_method


def ablation_scores(cap: LayerCapture, batch_size: int | None = None) -> Tensor:
    """Target score :math:`y_k` of every image with each channel ``k`` of the layer set to 0.

    Only the network after the layer runs: row ``(n, k)`` is image ``n``'s activation with
    channel ``k`` zeroed, batched over images and channels. Returns ``(N, C)``.
    """
    if cap.split is None:
        raise ValueError(
            "layer: Ablation-CAM re-runs the network after the layer, which needs a model that "
            "torch.fx can trace"
        )
    a = cap.raw_activation
    n, c = a.shape[:2]
    rows = rows_per_batch(a, batch_size)
    # float32 even when the network runs in bfloat16/float16: y - y_k cancels digits.
    scores = a.new_empty(n * c, dtype=torch.float64 if a.dtype == torch.float64 else torch.float32)
    for carried in cap.carry:
        if not isinstance(carried, Tensor) or carried.shape[:1] != (n,):
            raise ValueError(
                "layer: the network after this layer reads a value without a batch dimension "
                f"({type(carried).__name__}); choose another layer for Ablation-CAM"
            )
    with no_autograd():
        # One buffer for every chunk's ablated copies: a fresh allocation per chunk costs page
        # faults comparable to the suffix itself at small layers.
        buffer = a.new_empty((min(rows, n * c), *a.shape[1:]))
        for start in range(0, n * c, rows):
            index = torch.arange(start, min(start + rows, n * c), device=a.device)
            image, channel = index // c, index % c
            ablated = torch.index_select(a, 0, image, out=buffer[: len(index)])
            ablated[torch.arange(len(index), device=a.device), channel] = 0
            logits = cap.split.suffix_on_owned(ablated, *[t[image] for t in cap.carry])
            chunk_scores = cap.targets.scores(logits, image)
            scores[start : start + len(index)] = chunk_scores.to(scores.dtype)
    return scores.view(n, c)


def ablationcam_contributions(
    cap: LayerCapture, model: nn.Module, x: Tensor, batch_size: int | None = None
) -> tuple[Tensor, Tensor]:
    r""":math:`w_k = (y - y_k) / y` with :math:`y_k` the score when channel ``k`` is zeroed;
    contributions :math:`w_k A_k`."""
    if (
        cap.activation is not cap.raw_activation
        and cap.activation.shape != cap.raw_activation.shape
    ):
        raise ValueError(
            "reshape_transform: Ablation-CAM ablates channels of the layer output "
            "itself and does not support a reshape_transform"
        )
    y = cap.targets.scores(cap.logits)[:, None]
    weights = (y - ablation_scores(cap, batch_size)) / y
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
    batched over images and channels (``batch_size=`` rows per run, default by memory).""",
)
