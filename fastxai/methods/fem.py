"""FEM, the Feature Explanation Method (Fuad et al., 2020): channels weighed by how often they
fire above their own k-sigma threshold."""

from __future__ import annotations

from torch import Tensor, nn

from fastxai.capture import LayerCapture
from fastxai.methods._base import make_cam_method


def fem_contributions(
    cap: LayerCapture, model: nn.Module, x: Tensor, k: float = 2.0
) -> tuple[Tensor, Tensor]:
    r""":math:`w_c` = the fraction of positions where :math:`A_c > \mu_c + k \sigma_c` (mean and
    population standard deviation over the positions of channel ``c``, in float64);
    contributions :math:`w_c A_c`."""
    a = cap.activation
    exact = a.double()
    mean = exact.mean((2, 3), keepdim=True)
    std = exact.std((2, 3), correction=0, keepdim=True)
    weights = (exact > mean + k * std).double().mean((2, 3)).to(a.dtype)
    return weights[:, :, None, None] * a, weights


fem = make_cam_method(
    "fem",
    fem_contributions,
    with_gradient=False,
    differentiable=False,
    summary=r"""FEM (Feature Explanation Method): :math:`M = \mathrm{ReLU}(\sum_c w_c A_c)` with
    :math:`w_c` the share of positions where channel ``c`` exceeds its mean plus ``k=`` (default
    2) standard deviations (class-agnostic: ``targets`` only choose what ``Explanation.targets``
    reports), then min-max, bilinear upsampling, min-max.""",
)
