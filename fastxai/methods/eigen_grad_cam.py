"""Eigen-Grad-CAM: Eigen-CAM (Muhammad and Yeasin, 2020) on gradient-weighted activations."""

from __future__ import annotations

from torch import Tensor, nn

from fastxai.capture import LayerCapture
from fastxai.methods._base import make_cam_method
from fastxai.methods._projection import SvdSign, first_component_projection


def eigengradcam_contributions(
    cap: LayerCapture,
    model: nn.Module,
    x: Tensor,
    svd_sign: SvdSign = "largest_positive",
) -> tuple[Tensor, None]:
    r"""The first principal component's projection of :math:`g \odot A`, as one pseudo-channel."""
    return first_component_projection(cap.gradient * cap.activation, svd_sign)[:, None], None


eigengradcam = make_cam_method(
    "eigengradcam",
    eigengradcam_contributions,
    with_gradient=True,
    differentiable=False,
    reads_svd_sign=True,
    summary=r"""Eigen-Grad-CAM: the projection of :math:`g \odot A` (each position a vector over
    channels, centred per channel) on its first principal component, then ReLU, min-max,
    bilinear upsampling, min-max. The sign is fixed so that the largest-magnitude value is
    positive (``svd_sign="numpy"``: pytorch-grad-cam's sign); ``eigen_smooth`` changes nothing
    (the map already is a projection).""",
)
