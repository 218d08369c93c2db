"""The one fake kernel and the one autograd formula of ``layercam`` and ``mask_priors``.

Both backends register them: the C++ ops (:mod:`fastxai.ops._layercam_priors`) and the Triton
ops (:mod:`fastxai.ops.triton`); each backend passes its own backward kernel.
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


def register_layercam_autograd(op: Any, backward_op: Callable[..., tuple[Tensor, Tensor]]) -> None:
    """``op``'s backward: ``backward_op(grad_map, gradient, activation, map)`` (the saved map
    gives the outer ReLU's mask)."""

    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs, output)

    def backward(ctx: Any, grad_map: Tensor) -> tuple[Tensor, Tensor]:
        gradient, activation, saved_map = ctx.saved_tensors
        return backward_op(grad_map, gradient, activation, saved_map)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def register_mask_priors_autograd(op: Any, backward_op: Callable[..., Tensor]) -> None:
    """``op``'s backward: ``backward_op(grad_terms, p, neighbours)``."""

    def setup_context(ctx: Any, inputs: tuple[Tensor, int], output: Tensor) -> None:
        p, neighbours = inputs
        ctx.save_for_backward(p)
        ctx.neighbours = neighbours

    def backward(ctx: Any, grad_terms: Tensor) -> tuple[Tensor, None]:
        (p,) = ctx.saved_tensors
        return backward_op(grad_terms, p, ctx.neighbours), None

    torch.library.register_autograd(op, backward, setup_context=setup_context)
