"""HiResCAM (Draelos and Carin, 2020)."""

from __future__ import annotations

from torch import Tensor, nn

from fastxai.capture import LayerCapture
from fastxai.methods._base import make_cam_method


def hirescam_contributions(cap: LayerCapture, model: nn.Module, x: Tensor) -> tuple[Tensor, None]:
    r"""Contributions :math:`g_{kij} A_{kij}` (the gradient keeps its sign)."""
    return cap.gradient * cap.activation, None


hirescam = make_cam_method(
    "hirescam",
    hirescam_contributions,
    with_gradient=True,
    summary=r"""HiResCAM: :math:`M = \mathrm{ReLU}(\sum_k g_k \odot A_k)`, then min-max, bilinear
    upsampling, min-max.""",
)
