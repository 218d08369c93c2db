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
from PIL import Image
from torch import Tensor, nn

from fastxai._modes import buffers_kept
from fastxai.capture import ReshapeTransform
from fastxai.compat.feature_factorization.nmf import nmf
from fastxai.compat.utils.factorization_image import (
    create_labels_legend,
    show_factorization_on_image,
)
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
            # a train-mode model runs as it is (batch statistics), as in pytorch-grad-cam, but
            # no running statistic is written
            with torch.no_grad(), buffers_kept(self.model):
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
        with torch.no_grad(), buffers_kept(self.model):
            concept_tensors = torch.from_numpy(np.float32(concepts).T.copy())
            outputs = self.computation_on_concepts(concept_tensors).cpu().numpy()
        return concepts, maps, outputs


def run_dff_on_image(
    model: nn.Module,
    target_layer: nn.Module,
    classifier: Callable[[Tensor], Tensor],
    img_pil: Image.Image,
    img_tensor: Tensor,
    reshape_transform: ReshapeTransform | None = None,
    n_components: int = 5,
    top_k: int = 2,
) -> np.ndarray:
    """pytorch-grad-cam's one-image Deep Feature Factorization picture: the image, its
    concepts coloured on it (image weight 0.3) and a legend of each concept's ``top_k``
    classes by the softmax of ``classifier`` on the concept, side by side: uint8 ``(H, 3W, 3)``.

    ``img_tensor`` ``(C, H, W)`` is the model's input for ``img_pil`` (an RGB picture of the
    same size); the class names are ``model.config.id2label`` (a Hugging Face model's).
    ``reshape_transform`` defaults to ``None`` (pytorch-grad-cam's default is a typing object
    that fails when called, so its users pass one).
    """
    labels = getattr(getattr(model, "config", None), "id2label", None)
    if labels is None:
        raise ValueError(
            "model: run_dff_on_image names the classes from model.config.id2label (a Hugging "
            "Face model's); give the model a config with id2label"
        )
    if not isinstance(img_tensor, Tensor) or img_tensor.dim() != 3:
        raise ValueError("img_tensor must be a torch.Tensor (C, H, W): one image")
    picture = np.array(img_pil)
    factorization = DeepFeatureFactorization(
        model, target_layer, reshape_transform, computation_on_concepts=classifier
    )
    _, maps, outputs = factorization(img_tensor[None], n_components)
    scores = torch.softmax(torch.from_numpy(outputs), dim=-1).numpy()
    visualization = show_factorization_on_image(
        picture / 255,
        maps[0],
        image_weight=0.3,
        concept_labels=create_labels_legend(scores, labels=labels, top_k=top_k),
    )
    return np.hstack((picture, visualization))
