"""Grad-CAM (Selvaraju et al., 2017)."""

from __future__ import annotations

from torch import Tensor, nn

from fastxai.capture import LayerCapture
from fastxai.methods._base import make_cam_method


def gradcam_contributions(cap: LayerCapture, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`w_k = \frac{1}{hw}\sum_{ij} g_{kij}`, contributions :math:`w_k A_k`."""
    weights = cap.gradient.mean((2, 3))
    return weights[:, :, None, None] * cap.activation, weights


gradcam = make_cam_method(
    "gradcam",
    gradcam_contributions,
    with_gradient=True,
    summary=r"""Grad-CAM: :math:`M = \mathrm{ReLU}(\sum_k w_k A_k)` with
    :math:`w_k = \mathrm{mean}_{ij}\, \partial y_c / \partial A_{kij}`, then per-map min-max,
    bilinear upsampling to the input (``align_corners=False``) and min-max again.""",
)
