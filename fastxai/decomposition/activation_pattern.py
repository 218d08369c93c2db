"""APOP, Activation-Pattern-Only Prediction (the SRD paper's observation).

The network runs on ``x_other`` with every ReLU replaced by the binary gate of ``x_pattern``
(:math:`z \\mapsto z \\odot 1[z_{pattern} > 0]`) and every max-pool gathering at the arg-max
positions of ``x_pattern``; convolutions, BatchNorm (eval) and Linear layers stay affine.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastxai.decomposition.explain import check_model_and_images
from fastxai.decomposition.gates import Gates
from fastxai.decomposition.walk import trace_forward


def apop(model: nn.Module, x_pattern: Tensor, x_other: Tensor) -> Tensor:
    """Logits ``(N, K)`` of ``model`` on ``x_other`` gated by the activation pattern (ReLU gates
    and max-pool indices) of ``x_pattern``, image by image.

    Args:
        model: a torchvision ResNet or VGG in eval mode; never modified.
        x_pattern: ``(N, 3, H, W)`` images whose activation pattern is kept.
        x_other: ``(N, 3, H, W)`` images the gated network runs on (e.g. zeros, noise, or
            other images).
    """
    check_model_and_images(model, x_pattern, "apop", "x_pattern")
    check_model_and_images(model, x_other, "apop", "x_other")
    if x_other.shape != x_pattern.shape:
        raise ValueError(
            f"x_other must have the shape of x_pattern {tuple(x_pattern.shape)}, "
            f"got {tuple(x_other.shape)}"
        )
    with torch.no_grad():
        pattern = Gates()
        trace_forward(model, x_pattern, pattern)
        return trace_forward(model, x_other, Gates(replay=pattern)).logits


def apop_agreement(model: nn.Module, x_pattern: Tensor, x_other: Tensor) -> float:
    """APOP top-1 agreement: the fraction of images whose gated prediction on ``x_other``
    (:func:`apop`) equals the model's top-1 class on ``x_pattern``."""
    logits = apop(model, x_pattern, x_other)
    if logits.shape[0] == 0:
        raise ValueError("x_pattern: the batch is empty, so there is no agreement to report")
    with torch.no_grad():
        original = trace_forward(model, x_pattern).logits
    return float((logits.argmax(1) == original.argmax(1)).float().mean())
