"""Seg-Eigen-CAM (Chung and Ying, 2025): Eigen-CAM of the activations weighted element-wise by
the absolute gradient."""

from __future__ import annotations

from torch import Tensor, nn

from fastxai.capture import LayerCapture
from fastxai.methods._base import make_cam_method
from fastxai.methods._projection import first_component_projection


def segeigencam_contributions(
    cap: LayerCapture, model: nn.Module, x: Tensor
) -> tuple[Tensor, None]:
    r"""The first principal component's projection of :math:`|g| \odot A`, its sign such that
    the largest-magnitude value is positive (the paper's sign correction), as one pseudo-channel."""
    return first_component_projection(cap.gradient.abs() * cap.activation)[:, None], None


segeigencam = make_cam_method(
    "segeigencam",
    segeigencam_contributions,
    with_gradient=True,
    differentiable=False,
    summary=r"""Seg-Eigen-CAM: the projection of :math:`|g| \odot A` (each position a vector over
    channels, centred per channel) on its first principal component, its sign such that the
    largest-magnitude value is positive (the paper's correction, as in pytorch-grad-cam), then
    ReLU, min-max, bilinear upsampling, min-max. ``eigen_smooth`` changes nothing.""",
)
