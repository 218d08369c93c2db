"""XGrad-CAM (Fu et al., 2020)."""

from __future__ import annotations

from torch import Tensor, nn

from fastxai.capture import LayerCapture
from fastxai.methods._base import make_cam_method

XGRADCAM_EPS = 1e-7  # pytorch-grad-cam's constant


def xgradcam_contributions(cap: LayerCapture, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`w_k = \sum_{ij} g_{kij} A_{kij} / (\sum_{ij} A_{kij} + 10^{-7})`; contributions
    :math:`w_k A_k`."""
    a, g = cap.activation, cap.gradient
    weights = (g * a / (a.sum((2, 3), keepdim=True) + XGRADCAM_EPS)).sum((2, 3))
    return weights[:, :, None, None] * a, weights


xgradcam = make_cam_method(
    "xgradcam",
    xgradcam_contributions,
    with_gradient=True,
    summary=r"""XGrad-CAM: :math:`M = \mathrm{ReLU}(\sum_k w_k A_k)` with :math:`w_k = \sum_{ij}
    g_{kij} A_{kij} / (\sum_{ij} A_{kij} + 10^{-7})`, then min-max, bilinear upsampling and
    min-max.""",
)
