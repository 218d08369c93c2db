"""Element-wise Grad-CAM: HiResCAM's products with each one rectified before the channel sum."""

from __future__ import annotations

from torch import Tensor, nn

from fastxai.capture import LayerCapture
from fastxai.methods._base import make_cam_method


def gradcamelementwise_contributions(
    cap: LayerCapture, model: nn.Module, x: Tensor
) -> tuple[Tensor, None]:
    r"""Contributions :math:`\mathrm{ReLU}(g_{kij} A_{kij})`."""
    return (cap.gradient * cap.activation).clamp_min(0), None


gradcamelementwise = make_cam_method(
    "gradcamelementwise",
    gradcamelementwise_contributions,
    with_gradient=True,
    summary=r"""Element-wise Grad-CAM: :math:`M = \sum_k \mathrm{ReLU}(g_k \odot A_k)`, then
    min-max, bilinear upsampling, min-max.""",
)
