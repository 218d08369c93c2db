"""Shapley-CAM (Cai, 2025): Grad-CAM's weights with a second-order (Hessian) correction."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastxai.capture import LayerCapture, ReshapeTransform
from fastxai.methods._base import make_cam_method


def hessian_activation_product(cap: LayerCapture) -> Tensor:
    r""":math:`H A` with :math:`H = \partial^2 (\sum_n s_n) / \partial A^2` at the layer output
    :math:`A` (before any ``reshape_transform``), by differentiating the network after the layer
    twice. A network that is piecewise linear after the layer (ReLU, max-pool, linear) gives 0.
    """
    if cap.split is None:
        raise ValueError(
            "layer: Shapley-CAM differentiates the network after the layer twice, which needs "
            "a model that torch.fx can trace"
        )
    a = cap.raw_activation.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = cap.split.suffix(a, *cap.carry)
        total = cap.targets.scores(logits).sum()
        (gradient,) = torch.autograd.grad(total, a, create_graph=True)
        if not gradient.requires_grad:
            return torch.zeros_like(a).detach()
        (hvp,) = torch.autograd.grad(gradient, a, grad_outputs=a.detach(), allow_unused=True)
    return torch.zeros_like(a).detach() if hvp is None else hvp.detach()


def shapleycam_contributions(
    cap: LayerCapture,
    model: nn.Module,
    x: Tensor,
    reshape_transform: ReshapeTransform | None = None,
) -> tuple[Tensor, Tensor]:
    r""":math:`w_k = \mathrm{mean}_{ij}(g - \tfrac12 H A)_{kij}`, contributions :math:`w_k A_k`."""
    hvp = hessian_activation_product(cap)
    if reshape_transform is not None:
        hvp = reshape_transform(hvp)
    hvp = hvp.to(cap.gradient.dtype)
    weights = (cap.gradient - 0.5 * hvp).mean((2, 3))
    return weights[:, :, None, None] * cap.activation, weights


shapleycam = make_cam_method(
    "shapleycam",
    shapleycam_contributions,
    with_gradient=True,
    differentiable=False,
    reruns_suffix=True,
    reads_reshape_transform=True,
    summary=r"""Shapley-CAM: :math:`M = \mathrm{ReLU}(\sum_k w_k A_k)` with
    :math:`w_k = \mathrm{mean}_{ij}(g - \tfrac12 H A)_{kij}`, :math:`g` the gradient of the target
    score at the layer output :math:`A` and :math:`H A` its Hessian-vector product with
    :math:`A` (the second-order term of the score's Taylor expansion along :math:`A`), then
    min-max, bilinear upsampling, min-max. Equals Grad-CAM where the network after the layer is
    piecewise linear. Needs a model that torch.fx can split at the layer.""",
)
