"""The Activation Matching loss terms (the paper's and the authors' notebook's), each per image
(shape ``(N,)``).

Per-image terms let many images (each with its own generator) train in one step: the summed loss
gives every generator exactly the gradient it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from fastxai import ops
from fastxai.matching.features import COSINE

STD_EPS = 1e-6
COSINE_EPS = 1e-8

TERMS = ("act", "kl", "ce", "area", "bin", "tv", "rob", "nec")


@dataclass(frozen=True)
class LossWeights:
    """Weights :math:`\\lambda` of :math:`L = \\sum_t \\lambda_t L_t`.

    The notebook's ResNet-18 values, except two terms that changed meaning:

    * ``tv``: the notebook's 500 weighted its 8-neighbour TV; the default here is the paper's
      4-neighbour TV, which on blob-like binary masks at 224 is half of it (tv8 / tv4 measured
      1.91-2.00 on thresholded smooth noise keeping 3-50% of the pixels), so 1000 keeps the
      notebook's effective weight.
    * ``rob``: the notebook's 100 weighted a KL term that sent no gradient; it is now a trained
      cross-entropy on the noisy-background copy, the same kind of term as ``ce``, so it gets
      ``ce``'s weight (15) rather than outweighing it 7:1.
    """

    act: float = 10.0
    kl: float = 5.0
    ce: float = 15.0
    area: float = 100.0
    bin: float = 1.0
    tv: float = 1000.0
    rob: float = 15.0
    nec: float = 0.0

    def as_tensor(self, like: Tensor) -> Tensor:
        """The weights in :data:`TERMS` order, as a tensor like ``like``."""
        return torch.tensor([getattr(self, t) for t in TERMS], dtype=like.dtype, device=like.device)

    @classmethod
    def from_any(cls, weights: object, defaults: LossWeights | None = None) -> LossWeights:
        """``None`` (``defaults``, else the class defaults), a :class:`LossWeights`, or a mapping
        overriding some terms of ``defaults``."""
        base = cls() if defaults is None else defaults
        if weights is None:
            return base
        if isinstance(weights, cls):
            return weights
        if not isinstance(weights, dict):
            raise TypeError(
                f"weights must be None, a LossWeights or a dict, got {type(weights).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = set(weights) - known
        if unknown:
            raise ValueError(f"weights: unknown terms {sorted(unknown)}; known: {list(TERMS)}")
        for name, value in weights.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"weights[{name!r}] must be a number >= 0, got {value!r}")
        return replace(base, **{k: float(v) for k, v in weights.items()})


def standardise(a: Tensor) -> Tensor:
    """Per sample and channel, :math:`(a - \\mu) / (\\sigma + 10^{-6})` over the spatial axes
    (:math:`\\sigma` the unbiased standard deviation)."""
    mean = a.mean((2, 3), keepdim=True)
    std = a.std((2, 3), keepdim=True)
    return (a - mean) / (std + STD_EPS)


def cosine_distance(target: Tensor, actual: Tensor) -> Tensor:
    r"""Per image, :math:`1 - \overline{\cos(a_{:,i,j}, b_{:,i,j})}`: one minus the mean over
    positions of the cosine between channel vectors (eps :math:`10^{-8}`).

    Where both channel vectors are zero (common after a ReLU) the cosine is taken as 1, not the
    notebook's 0, so that the distance of a map to itself is 0.
    """
    cosine = F.cosine_similarity(target, actual, dim=1, eps=COSINE_EPS)
    both_zero = (target == 0).all(1) & (actual == 0).all(1)
    cosine = torch.where(both_zero, torch.ones_like(cosine), cosine)
    return 1 - cosine.flatten(1).mean(1)


def standardised_mse(target: Tensor, actual: Tensor) -> Tensor:
    """Per image, the mean squared error of the per-channel standardised maps."""
    return (standardise(target) - standardise(actual)).square().flatten(1).mean(1)


def activation_loss(
    targets: list[Tensor], actual: list[Tensor], weights: list[float], distances: list[str]
) -> Tensor:
    """:math:`L_{act} = \\sum_\\ell \\alpha_\\ell d_\\ell(\\varphi_\\ell(x), \\varphi_\\ell(e))`
    per image; ``d`` is :func:`cosine_distance` or :func:`standardised_mse`."""
    total = targets[0].new_zeros(targets[0].shape[0])
    for target, act, weight, distance in zip(targets, actual, weights, distances, strict=True):
        d = cosine_distance if distance == COSINE else standardised_mse
        total = total + weight * d(target, act)
    return total


def kl_loss(target_logits: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """Per image, :math:`T^2 \\, KL(\\mathrm{softmax}(z_x/T) \\| \\mathrm{softmax}(z_e/T))`."""
    log_p = F.log_softmax(target_logits / temperature, 1)
    log_q = F.log_softmax(logits / temperature, 1)
    return (log_p.exp() * (log_p - log_q)).sum(1) * temperature**2


def ce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per image, :math:`-\\log \\mathrm{softmax}(z)_y`."""
    return F.cross_entropy(logits, labels, reduction="none")


def necessity_loss(
    target_logits: Tensor, complement_logits: Tensor, labels: Tensor, margin: float = 1.0
) -> Tensor:
    """Per image, :math:`\\max(0, \\mathrm{margin} - (z_y(x) - z_y(x_c)))` with
    :math:`x_c = (1 - m) \\odot x`: removing the kept pixels should lower the class logit."""
    index = labels[:, None]
    drop = target_logits.gather(1, index)[:, 0] - complement_logits.gather(1, index)[:, 0]
    return F.relu(margin - drop)


def mask_prior_losses(p: Tensor, neighbours: int) -> Tensor:
    """``(N, 3)``: :math:`\\overline{p}`, :math:`\\overline{p(1-p)}` and the mean-reduced L1 total
    variation of ``p`` (4- or 8-neighbour), from the fused :func:`fastxai.ops.mask_priors`."""
    return ops.mask_priors(p, neighbours)
