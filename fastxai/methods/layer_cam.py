"""Layer-CAM (Jiang et al., 2021)."""

from __future__ import annotations

from torch import Tensor, nn

from fastxai import ops
from fastxai.capture import LayerCapture
from fastxai.methods._base import make_cam_method, map_dtype


def layercam_contributions(cap: LayerCapture, model: nn.Module, x: Tensor) -> tuple[Tensor, None]:
    r"""Element-wise weights: contributions :math:`\mathrm{ReLU}(g_{kij})\, A_{kij}`."""
    return cap.gradient.clamp_min(0) * cap.activation, None


def layercam_raw_map(cap: LayerCapture, model: nn.Module, x: Tensor) -> Tensor:
    r""":math:`M = \mathrm{ReLU}(\sum_k \mathrm{ReLU}(g_k) \odot A_k)` in one pass
    (:func:`fastxai.ops.layercam`), without materialising the contributions."""
    dtype = map_dtype(cap.activation)
    return ops.layercam(cap.gradient.to(dtype), cap.activation.to(dtype))


layercam = make_cam_method(
    "layercam",
    layercam_contributions,
    with_gradient=True,
    raw_map=layercam_raw_map,
    summary=r"""Layer-CAM: :math:`M = \mathrm{ReLU}(\sum_k \mathrm{ReLU}(g_k) \odot A_k)`, then
    min-max, bilinear upsampling, min-max. Several layers fuse by ``fusion="mean"``
    (pytorch-grad-cam) or by the paper's ``"tanh"`` scaling with an element-wise maximum.
    ``raw`` is :math:`M`, after its ReLU (the fused kernel applies it).""",
)
