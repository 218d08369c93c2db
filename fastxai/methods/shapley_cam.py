"""Shapley-CAM (Cai, 2025): Grad-CAM's weights with a second-order (Hessian) correction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fastxai.capture import LayerCapture, ReshapeTransform, split_layer_ref
from fastxai.layer_substitution import output_substituted
from fastxai.methods._base import make_cam_method


def hessian_activation_product(cap: LayerCapture, model: nn.Module, x: Tensor) -> Tensor:
    r""":math:`H A` with :math:`H = \partial^2 (\sum_n s_n) / \partial A^2` at the layer output
    :math:`A` (before any ``reshape_transform``), by differentiating the network after the layer
    twice. A network that is piecewise linear after the layer (ReLU, max-pool, linear) gives 0.

    The network after the layer runs on its own where the model was split there; otherwise the
    whole model runs with the layer's output replaced (:mod:`fastxai.layer_substitution`), its
    work before the layer repeated once.
    """
    a = cap.raw_activation
    if not isinstance(a, Tensor):
        raise ValueError(
            f"layer {cap.layer!r}: Shapley-CAM differentiates the network after a layer that "
            f"yields a tensor, this one yields {type(a).__name__}"
        )
    a = a.detach().requires_grad_(True)
    if cap.split is not None:
        split, carry = cap.split, cap.carry
        return _hessian_product(cap, a, lambda activation: split.suffix(activation, *carry))
    name, call_index = split_layer_ref(cap.layer)
    with output_substituted(model, model.get_submodule(name), call_index) as substitution:
        # a copy: the network after the layer may modify its input in place
        return _hessian_product(cap, a, lambda activation: substitution.run(x, activation.clone()))


def _hessian_product(cap: LayerCapture, a: Tensor, run: Callable[[Tensor], Any]) -> Tensor:
    """:math:`H A` of the summed target scores of ``run(a)``, the model's output for the layer
    output ``a`` (a leaf that requires grad)."""
    with torch.enable_grad():
        total = cap.targets.scores(run(a)).sum()
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
    hvp = hessian_activation_product(cap, model, x)
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
    piecewise linear. Where torch.fx cannot split the model at the layer, the whole model is
    re-run once with a temporary forward hook replacing the layer's output (its work before the
    layer repeated).""",
)
