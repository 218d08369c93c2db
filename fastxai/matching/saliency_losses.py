"""The losses of real-time saliency (Dabkowski & Gal, "Real Time Image Saliency for Black Box
Classifiers", NeurIPS 2017, §3-4) that train the amortised Activation Matching decoder.

For a soft mask :math:`m \\in [0, 1]^{H \\times W}` (1 = keep), class :math:`c` and logits
:math:`z`, with :math:`\\mathrm{margin}_c(z) = z_c - \\max_{j \\ne c} z_j`:

.. math::
    L = \\lambda_{TV} \\mathrm{TV}(m)
    + \\max\\big(\\mathrm{margin}_c(f(\\Phi(x, 1 - m))), -\\kappa_D\\big)
    + \\lambda_P \\max\\big(-\\mathrm{margin}_c(f(\\Phi(x, m))), -\\kappa_P\\big)

The preserver (last term) wants the kept region alone to win class :math:`c` by a margin of
:math:`\\kappa_P`; the destroyer (second term) wants the image without it to lose :math:`c` by
:math:`\\kappa_D`. TV is the sum of squared neighbour differences plus a border term, halved and
averaged over the batch, taken at a quarter of the image size (the reference decoder's 56 x 56
at 224). :math:`\\Phi(x, m) = m \\odot \\tilde x + (1 - m) \\odot r`: ``x`` with faint noise,
and a background ``r`` that is, per image with probability ½ each, the image blurred (sigma 11 px
at 224) or noise plus a random colour. Noise and colour are scaled by the per-channel standard
deviation of the training images (``scale``) and centred on their mean, so they follow the
model's input normalisation. The defaults are the reference implementation's
(``PiotrDabkowski/pytorch-saliency``), its image-domain amplitudes expressed in units of a
photo's standard deviation (about 0.5 in its ``[-1, 1]`` domain).

The paper's area term, :math:`\\lambda_A \\mathrm{mean}((m + \\epsilon)^{0.3})`, is left out: the
amortised masks keep a given area by construction (:func:`fastxai.matching.amortised.rung_mask`).
With it, on EfficientNet-Lite0 and a few hundred CPU steps, every mask emptied within the first
steps (its gradient is largest at small :math:`m`), whatever the start or the warm-up of its
weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastxai.matching.robustness import blurred

BLUR_SIGMA_224 = 11.0
NOISE_STD = 0.22  # x the training images' per-channel standard deviation
COLOUR_RANGE = 1.32  # width of the uniform random colour, same units
KEPT_NOISE_STD = 0.06  # faint noise on the kept pixels, same units
BLURRED_SHARE = 0.5
SMOOTHNESS_STRIDE = 4  # TV is taken at 1/4 of the image size, the reference decoder's resolution


@dataclass(frozen=True)
class SaliencyWeights:
    """:math:`\\lambda_{TV}`, the TV border weight, :math:`\\lambda_P`, :math:`\\kappa_P` and
    :math:`\\kappa_D` (destroyer weight 1)."""

    smoothness: float = 0.5
    border: float = 0.3
    preserver: float = 0.3
    preserver_confidence: float = 1.0
    destroyer_confidence: float = 5.0


def class_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """``(N,)``: :math:`z_c - \\max_{j \\ne c} z_j`."""
    chosen = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return chosen - others.amax(1)


def smoothness_loss(mask: Tensor, border: float) -> Tensor:
    """``(N,)``: squared total variation plus ``border`` x the squared border values, halved."""
    dy = (mask[..., 1:, :] - mask[..., :-1, :]).pow(2).flatten(1).sum(1)
    dx = (mask[..., :, 1:] - mask[..., :, :-1]).pow(2).flatten(1).sum(1)
    edges = (
        mask[..., 0, :].pow(2).flatten(1).sum(1)
        + mask[..., -1, :].pow(2).flatten(1).sum(1)
        + mask[..., :, 0].pow(2).flatten(1).sum(1)
        + mask[..., :, -1].pow(2).flatten(1).sum(1)
    )
    return (dy + dx + border * edges) / 2


def random_backgrounds(
    x: Tensor, mean: Tensor, scale: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``(noisy x, r)`` for :math:`\\Phi`: ``x`` plus faint noise, and per image the blurred
    image or noise plus a random colour (``mean``, ``scale``: ``(1, C, 1, 1)``)."""
    n, c = x.shape[:2]

    def draw(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)

    def uniform(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype)

    noisy = x + KEPT_NOISE_STD * scale * draw(*x.shape)
    colour = (uniform(n, c, 1, 1) - 0.5) * COLOUR_RANGE * scale
    noise = mean + colour + NOISE_STD * scale * draw(*x.shape)
    sigma = BLUR_SIGMA_224 * min(x.shape[-2:]) / 224
    use_blur = (uniform(n, 1, 1, 1) < BLURRED_SHARE).to(x.dtype)
    return noisy, use_blur * blurred(x, sigma) + (1 - use_blur) * noise


def saliency_terms(
    mask: Tensor,
    logits_preserved: Tensor,
    logits_destroyed: Tensor,
    labels: Tensor,
    weights: SaliencyWeights,
) -> Tensor:
    """``(N, 3)``: the weighted [smoothness, preserver, destroyer] terms per image (their sum is
    :math:`L`)."""
    coarse = F.interpolate(
        mask, size=[max(1, s // SMOOTHNESS_STRIDE) for s in mask.shape[-2:]], mode="area"
    )
    smooth = weights.smoothness * smoothness_loss(coarse, weights.border)
    kept = class_margin(logits_preserved, labels)
    preserver = weights.preserver * torch.clamp(-kept, min=-weights.preserver_confidence)
    dropped = class_margin(logits_destroyed, labels)
    destroyer = torch.clamp(dropped, min=-weights.destroyer_confidence)
    return torch.stack([smooth, preserver, destroyer], 1)


SALIENCY_TERMS = ("smoothness", "preserver", "destroyer")
