"""The fake kernels and the autograd formulas of ``layercam`` and ``mask_priors``.

:mod:`fastxai.ops._registrations` registers them on the ops (whose backward op runs the kernel of
the tensors' device); ``backend="triton"`` wraps the Triton kernels in the same formulas
(:func:`differentiable`), with the Triton backward kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def layercam_fake(gradient: Tensor, activation: Tensor) -> Tensor:
    """``(N, C, h, w)`` twice -> ``(N, h, w)``."""
    torch._check(
        gradient.dim() == 4,
        lambda: f"layercam: gradient must be (N, C, h, w), got {gradient.dim()} dims",
    )
    return gradient.new_empty((gradient.shape[0], gradient.shape[2], gradient.shape[3]))


def layercam_backward_fake(
    grad_map: Tensor, gradient: Tensor, activation: Tensor, map: Tensor
) -> tuple[Tensor, Tensor]:
    return gradient.new_empty(gradient.shape), gradient.new_empty(gradient.shape)


def mask_priors_fake(p: Tensor, neighbours: int = 4) -> Tensor:
    """``(N, C, H, W)`` -> ``(N, 3)``."""
    torch._check(p.dim() == 4, lambda: f"mask_priors: p must be (N, C, H, W), got {p.dim()} dims")
    torch._check(
        neighbours in (4, 8), lambda: f"mask_priors: neighbours must be 4 or 8, got {neighbours}"
    )
    return p.new_empty((p.shape[0], 3))


def mask_priors_backward_fake(grad_terms: Tensor, p: Tensor, neighbours: int) -> Tensor:
    return p.new_empty(p.shape)


Formula = tuple[Callable[..., None], Callable[..., Any]]  # (setup_context, backward)


def layercam_formula(backward_op: Callable[..., tuple[Tensor, Tensor]]) -> Formula:
    """Layer-CAM's backward: ``backward_op(grad_map, gradient, activation, map)`` (the saved map
    gives the outer ReLU's mask)."""

    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs, output)

    def backward(ctx: Any, grad_map: Tensor) -> tuple[Tensor, Tensor]:
        gradient, activation, saved_map = ctx.saved_tensors
        return backward_op(grad_map, gradient, activation, saved_map)

    return setup_context, backward


def mask_priors_formula(backward_op: Callable[..., Tensor]) -> Formula:
    """The mask priors' backward: ``backward_op(grad_terms, p, neighbours)``."""

    def setup_context(ctx: Any, inputs: tuple[Tensor, int], output: Tensor) -> None:
        p, neighbours = inputs
        ctx.save_for_backward(p)
        ctx.neighbours = neighbours

    def backward(ctx: Any, grad_terms: Tensor) -> tuple[Tensor, None]:
        (p,) = ctx.saved_tensors
        return backward_op(grad_terms, p, ctx.neighbours), None

    return setup_context, backward


FORMULAS = {"layercam": layercam_formula, "mask_priors": mask_priors_formula}


def differentiable(forward: Callable[..., Any], formula: Formula) -> Callable[..., Any]:
    """``forward`` with ``formula`` as its backward, outside the dispatcher."""
    setup_context, backward = formula

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(*inputs: Any) -> Any:
            return forward(*inputs)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx: Any, *grads: Tensor) -> Any:
            return backward(ctx, *grads)

    return Function.apply
