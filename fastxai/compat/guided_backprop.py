"""Guided backpropagation (Springenberg et al., 2015, Sec. 3.4), pytorch-grad-cam's class."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastxai._checks import model_device
from fastxai._modes import evaluated


class _PositiveGradient(torch.autograd.Function):
    """Identity forward; backward keeps only the positive part of the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.clamp_min(0)


def _guide(_module: nn.Module, _inputs: Any, output: Tensor) -> Tensor:
    return _PositiveGradient.apply(output)


def _check_category(category: Any, output: Tensor) -> None:
    num_classes = output.shape[-1] if output.dim() == 2 else None
    if (
        num_classes is None
        or isinstance(category, bool)
        or not isinstance(category, (int, np.integer))
        or not 0 <= category < num_classes
    ):
        raise ValueError(
            f"target_category: expected a class index in [0, {num_classes}) of the model's "
            f"(N, num_classes) output, got {category!r}"
        )


class GuidedBackpropReLUModel:
    r"""Input gradient with every ``nn.ReLU`` back-propagating
    :math:`\partial L / \partial x = [x > 0]\,[\delta > 0]\,\delta` (:math:`\delta` the gradient
    at its output), for the first image of the batch, returned as float32 ``(H, W, C)``.

    The model is not changed: its ReLUs are guided by forward hooks removed after the call (also
    when it raises), and it is explained in eval mode with each module's mode given back.
    """

    def __init__(self, model: nn.Module, device: Any = None) -> None:
        self.model = model
        own = model_device(model)
        if device is not None and own is not None and torch.device(device) != own:
            raise ValueError(
                f"device: the model is on {own} and fastxai does not move it; call "
                f"model.to({str(device)!r}) first"
            )
        self.device = own if own is not None else torch.device(device or "cpu")

    def forward(self, input_img: Tensor) -> Tensor:
        return self.model(input_img)

    def __call__(self, input_img: Tensor, target_category: int | None = None) -> np.ndarray:
        if not isinstance(input_img, Tensor) or input_img.dim() != 4:
            raise ValueError("input_img: expected a torch.Tensor of shape (N, C, H, W)")
        x = input_img.detach().to(self.device).requires_grad_(True)
        relus = [m for m in self.model.modules() if isinstance(m, nn.ReLU)]
        handles = [m.register_forward_hook(_guide) for m in relus]
        try:
            with evaluated(self.model), torch.enable_grad():
                output = self.forward(x)
                if target_category is None:
                    target_category = int(output[0].argmax())
                _check_category(target_category, output)
                (gradient,) = torch.autograd.grad(output[0, target_category], x)
        finally:
            for handle in handles:
                handle.remove()
        return gradient[0].permute(1, 2, 0).float().cpu().numpy()
