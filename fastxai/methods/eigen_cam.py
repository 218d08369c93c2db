"""Eigen-CAM (Muhammad and Yeasin, 2020)."""

from __future__ import annotations

from torch import Tensor, nn

from fastxai.capture import LayerCapture
from fastxai.methods._base import make_cam_method
from fastxai.methods._projection import SvdSign, first_component_projection


def eigencam_contributions(
    cap: LayerCapture,
    model: nn.Module,
    x: Tensor,
    svd_sign: SvdSign = "largest_positive",
) -> tuple[Tensor, None]:
    """The first principal component's projection, as a single pseudo-channel."""
    return first_component_projection(cap.activation, svd_sign)[:, None], None


eigencam = make_cam_method(
    "eigencam",
    eigencam_contributions,
    with_gradient=False,
    differentiable=False,
    reads_svd_sign=True,
    summary=r"""Eigen-CAM: the projection of the layer's activations on their first principal
    component (class-agnostic: ``targets`` only choose what ``Explanation.targets`` reports), then
    ReLU, min-max, bilinear upsampling, min-max. The sign is fixed so that the largest-magnitude
    value is positive (``svd_sign="numpy"``: pytorch-grad-cam's sign).""",
)
