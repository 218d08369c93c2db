"""Deep Feature Factorization (Collins et al., 2018) with pytorch-grad-cam's API.

The layer's activations of the whole batch, channels by positions, are shifted to be
non-negative (each channel by its minimum) and factorised by NMF into concepts (channels x k)
and per-position concept maps. The NMF is scikit-learn's ``NMF(init="random", random_state=0)``,
as pytorch-grad-cam runs it, computed in float64 by :mod:`.nmf` (no scikit-learn needed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastxai.capture import ReshapeTransform
from fastxai.compat.feature_factorization.nmf import nmf
from fastxai.compat.utils.image import scale_cam_image


def dff(activations: np.ndarray, n_components: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Concepts ``(C, k)`` (the NMF factor plus each channel's offset) and concept maps
    ``(N, k, h, w)`` of activations ``(N, C, h, w)``; NaN counts as 0. Returned in the
    activations' dtype."""
    n, c, h, w = activations.shape
    rows = np.nan_to_num(np.moveaxis(np.asarray(activations), 1, 0).reshape(c, -1), nan=0.0)
    offset = rows.min(axis=-1)
    weights, maps = nmf(torch.from_numpy(rows - offset[:, None]), n_components)
    concepts = (weights.numpy() + offset[:, None]).astype(rows.dtype)
    explanations = maps.numpy().reshape(n_components, n, h, w).transpose(1, 0, 2, 3)
    return concepts, explanations.astype(rows.dtype)


class DeepFeatureFactorization:
    """``DeepFeatureFactorization(model, target_layer, reshape_transform=None,
    computation_on_concepts=None)(input_tensor, n_components=16)`` returns the concepts
    ``(C, k)``, a list of each image's concept maps ``(k, H, W)`` in [0, 1] and, with
    ``computation_on_concepts`` (e.g. the classifier head), its output on the ``k`` concepts.
    The model runs as it is (no mode change); the layer is read through a temporary hook."""

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module,
        reshape_transform: ReshapeTransform | None = None,
        computation_on_concepts: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not isinstance(target_layer, nn.Module):
            raise ValueError(f"target_layer must be one module, got {type(target_layer).__name__}")
        self.model = model
        self.target_layer = target_layer
        self.reshape_transform = reshape_transform
        self.computation_on_concepts = computation_on_concepts

    def _activations(self, input_tensor: Tensor) -> np.ndarray:
        kept: list[Tensor] = []

        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            # a copy: a later in-place operation must not change what is factorised
            kept.append(output.detach().clone() if isinstance(output, Tensor) else output)

        handle = self.target_layer.register_forward_hook(keep)
        try:
            with torch.no_grad():
                self.model(input_tensor)
        finally:
            handle.remove()
        if not kept:
            raise ValueError("target_layer: the module is not called in the model's forward")
        activation = kept[0]
        if self.reshape_transform is not None:
            activation = self.reshape_transform(activation)
        if not isinstance(activation, Tensor) or activation.dim() != 4:
            got = tuple(activation.shape) if isinstance(activation, Tensor) else type(activation)
            raise ValueError(
                f"target_layer yields {got}; Deep Feature Factorization needs (N, C, h, w) maps "
                "(pass reshape_transform for token outputs)"
            )
        return activation.cpu().numpy()

    def __call__(self, input_tensor: Tensor, n_components: int = 16) -> tuple:
        if not isinstance(input_tensor, Tensor) or input_tensor.dim() != 4:
            raise ValueError("input_tensor must be a torch.Tensor (N, C, H, W)")
        height, width = input_tensor.shape[2:]
        concepts, explanations = dff(self._activations(input_tensor), n_components)
        maps = [scale_cam_image(image, (width, height)) for image in explanations]
        if self.computation_on_concepts is None:
            return concepts, maps
        with torch.no_grad():
            concept_tensors = torch.from_numpy(np.float32(concepts).T.copy())
            outputs = self.computation_on_concepts(concept_tensors).cpu().numpy()
        return concepts, maps, outputs
