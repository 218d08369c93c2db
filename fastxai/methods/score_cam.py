"""Score-CAM (Wang et al., 2020), as pytorch-grad-cam computes it, without duplicate forwards."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastxai._batching import no_autograd, rows_per_batch
from fastxai.capture import LayerCapture
from fastxai.methods._base import make_cam_method

SCORECAM_EPS = 1e-8  # pytorch-grad-cam's per-channel mask normalisation constant


def _upsample(a: Tensor, size: tuple[int, int]) -> Tensor:
    # pytorch-grad-cam upsamples the masks with nn.UpsamplingBilinear2d: align_corners=True.
    return F.interpolate(a[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]


def masked_scores(
    cap: LayerCapture, model: nn.Module, x: Tensor, batch_size: int | None = None
) -> tuple[Tensor, Tensor]:
    r"""Target score of every masked image :math:`x \odot M_k`, ``(N, C)``, and the mask of
    channels whose mask is identically zero, ``(N, C)`` bool.

    :math:`M_k = (U_k - \min U_k) / (\max U_k - \min U_k + 10^{-8})` with :math:`U_k` channel ``k``
    upsampled with ``align_corners=True``. A channel with :math:`\max U_k = \min U_k` has
    :math:`M_k \equiv 0`, so its masked image is all zeros whatever the image: that input is
    evaluated once for the whole batch instead of once per channel.
    """
    a = cap.activation
    n, c = a.shape[:2]
    size = (x.shape[2], x.shape[3])
    rows = rows_per_batch(x, batch_size)
    with no_autograd():
        flat = a.reshape(n * c, *a.shape[2:])
        lows, highs = [], []
        for start in range(0, n * c, rows):
            up = _upsample(flat[start : start + rows], size).flatten(1)
            lows.append(up.amin(1))
            highs.append(up.amax(1))
        low, high = torch.cat(lows), torch.cat(highs)
        constant = high == low
        scores = a.new_empty(n * c, dtype=cap.logits.dtype)
        if torch.compiler.is_compiling():
            # No data-dependent shapes under torch.compile: every channel gets its own forward
            # (a constant channel's mask is 0 / (0 + eps) = 0, so the same zero image).
            varying = torch.arange(n * c, device=a.device)
        else:
            if bool(constant.any()):
                zero_logits = model(torch.zeros_like(x[:1]))
                zero_image = torch.nonzero(constant)[:, 0] // c
                scores[constant] = cap.targets.scores(
                    zero_logits.expand(len(zero_image), -1), zero_image
                ).to(scores.dtype)
            varying = torch.nonzero(~constant)[:, 0]
        for start in range(0, len(varying), rows):
            index = varying[start : start + rows]
            image = index // c
            up = _upsample(flat[index], size)
            mask = (up - low[index, None, None]) / (
                high[index, None, None] - low[index, None, None] + SCORECAM_EPS
            )
            logits = model(x[image] * mask[:, None].to(x.dtype))  # a half model takes half
            scores[index] = cap.targets.scores(logits, image).to(scores.dtype)
    return scores.view(n, c), constant.view(n, c)


def scorecam_contributions(
    cap: LayerCapture, model: nn.Module, x: Tensor, batch_size: int | None = None
) -> tuple[Tensor, Tensor]:
    r""":math:`w = \mathrm{softmax}_k(s_k)` over channels of the masked-image target scores
    :math:`s_k = y_c(x \odot M_k)`; contributions :math:`w_k A_k` at the layer's resolution."""
    scores, _ = masked_scores(cap, model, x, batch_size)
    weights = torch.softmax(scores, dim=1).to(cap.activation.dtype)
    return weights[:, :, None, None] * cap.activation, weights


scorecam = make_cam_method(
    "scorecam",
    scorecam_contributions,
    with_gradient=False,
    differentiable=False,
    summary=r"""Score-CAM as pytorch-grad-cam computes it:
    :math:`M = \mathrm{ReLU}(\sum_k w_k A_k)`,
    :math:`w = \mathrm{softmax}_k\, y_c(x \odot M_k)` over channels, where :math:`M_k` is channel
    ``k`` upsampled (``align_corners=True``) and min-max scaled (eps :math:`10^{-8}`); then
    min-max, bilinear upsampling, min-max. Masked images run batched under inference mode
    (``batch_size=`` images per forward, default by memory), and channels whose mask is
    identically zero share one forward of the all-zero image.""",
)
