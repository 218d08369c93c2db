"""Grad-CAM++ (Chattopadhyay et al., 2018), as pytorch-grad-cam computes it."""

from __future__ import annotations

from torch import Tensor, nn

from fastxai.capture import LayerCapture
from fastxai.methods._base import make_cam_method

GRADCAMPP_EPS = 1e-6  # pytorch-grad-cam's constant: it visibly changes maps, so it stays exact


def gradcampp_contributions(
    cap: LayerCapture, model: nn.Module, x: Tensor
) -> tuple[Tensor, Tensor]:
    r""":math:`\alpha_{kij} = g^2 / (2 g^2 + (\sum_{ab} A_{kab}) g^3 + 10^{-6})` (0 where
    :math:`g = 0`), :math:`w_k = \sum_{ij} \mathrm{ReLU}(g_{kij}) \alpha_{kij}`; contributions
    :math:`w_k A_k`. Eq. 19 of the paper with raw-logit gradients."""
    a, g = cap.activation, cap.gradient
    g2 = g * g
    g3 = g2 * g  # evaluated in pytorch-grad-cam's order: the eps makes the map rounding-sensitive
    alpha = g2 / (2 * g2 + a.sum((2, 3), keepdim=True) * g3 + GRADCAMPP_EPS)
    alpha = alpha.masked_fill(g == 0, 0)
    weights = (g.clamp_min(0) * alpha).sum((2, 3))
    return weights[:, :, None, None] * a, weights


gradcampp = make_cam_method(
    "gradcampp",
    gradcampp_contributions,
    with_gradient=True,
    summary=r"""Grad-CAM++: :math:`M = \mathrm{ReLU}(\sum_k w_k A_k)` with :math:`w_k = \sum_{ij}
    \mathrm{ReLU}(g_{kij})\, g_{kij}^2 / (2 g_{kij}^2 + (\sum_{ab} A_{kab}) g_{kij}^3 + 10^{-6})`,
    then min-max, bilinear upsampling and min-max.""",
)
