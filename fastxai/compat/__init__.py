"""pytorch-grad-cam compatible classes: switch by changing the import.

``from fastxai.compat import GradCAM`` takes the constructor and call of pytorch-grad-cam 1.5.7
(``GradCAM(model, target_layers, reshape_transform=None)(input_tensor, targets, aug_smooth,
eigen_smooth)``) and returns the same float32 numpy array ``(N, H, W)`` in [0, 1]. Differences,
all deliberate:

- the model is never changed: no hooks, no ``.grad``, no layer swapping, and its mode stays as
  it is: a model in training mode is explained in eval mode, as pytorch-grad-cam explains it
  (which calls ``model.eval()`` on it for good), and each module's mode is given back after the
  call, also when it raises;
- one target for a batch applies to every image (pytorch-grad-cam explains only the first image
  and returns zero maps for the rest); any other length mismatch is an error;
- activations are captured faithfully where pytorch-grad-cam reads a tensor that a later in-place
  ReLU overwrote (e.g. vgg16 ``features[28]``, resnet ``layer1[0].bn1``): there the two differ;
- Ablation-CAM sets the ablated channel to 0 (the paper), also where the layer can be negative
  (pytorch-grad-cam uses min - 1e7 there), and re-runs only the network after the layer;
- Eigen-CAM / ``eigen_smooth`` fix the arbitrary SVD sign (largest-magnitude value positive).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
from torch import Tensor, nn

from fastxai import methods
from fastxai._checks import model_device
from fastxai._modes import evaluated
from fastxai.capture import ReshapeTransform
from fastxai.explanation import Explanation

# ttach's default in pytorch-grad-cam: horizontal flip x multiply by {0.9, 1, 1.1}
_AUGMENTATIONS = [(flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1)]


class BaseCAM:
    """A pytorch-grad-cam style explainer around one fastxai method."""

    method: ClassVar[Callable[..., Explanation]]

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform | None = None,
    ) -> None:
        if not isinstance(target_layers, (list, tuple)) or not target_layers:
            raise ValueError("target_layers must be a non-empty list of modules")
        self.model = model
        self.target_layers = list(target_layers)
        self.reshape_transform = reshape_transform
        self.outputs: Tensor | None = None
        self.batch_size: int | None = None

    def _method_options(self) -> dict[str, Any]:
        return {}

    def _targets(self, targets: Sequence[Callable] | None, n: int) -> Any:
        if targets is None:
            return None
        targets = list(targets)
        if len(targets) == 1 and n > 1:
            return targets * n
        return targets

    def _explain(self, x: Tensor, targets: Any, eigen_smooth: bool) -> Explanation:
        with evaluated(self.model):
            explanation = type(self).method(
                self.model,
                x,
                self.target_layers,
                self._targets(targets, x.shape[0]),
                reshape_transform=self.reshape_transform,
                eigen_smooth=eigen_smooth,
                **self._method_options(),
            )
        self.outputs = explanation.logits
        return explanation

    def forward(
        self, input_tensor: Tensor, targets: Sequence[Callable] | None, eigen_smooth: bool = False
    ) -> np.ndarray:
        device = model_device(self.model)
        x = input_tensor.to(device) if device is not None else input_tensor
        return self._explain(x, targets, eigen_smooth).numpy()

    def forward_augmentation_smoothing(
        self, input_tensor: Tensor, targets: Sequence[Callable] | None, eigen_smooth: bool = False
    ) -> np.ndarray:
        """Mean of the maps of the 6 flipped / scaled copies, each mapped back (not rescaled)."""
        device = model_device(self.model)
        x = input_tensor.to(device) if device is not None else input_tensor
        total = None
        for flip, factor in _AUGMENTATIONS:
            augmented = x * factor
            if flip:
                augmented = augmented.flip(-1)
            maps = self._explain(augmented, targets, eigen_smooth).maps
            if flip:
                maps = maps.flip(-1)
            total = maps if total is None else total + maps
        return (total / len(_AUGMENTATIONS)).float().cpu().numpy()

    def __call__(
        self,
        input_tensor: Tensor,
        targets: Sequence[Callable] | None = None,
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> np.ndarray:
        if not isinstance(input_tensor, Tensor):
            raise TypeError(
                f"input_tensor must be a torch.Tensor (N, C, H, W), got "
                f"{type(input_tensor).__name__} (torch.from_numpy converts an array)"
            )
        if aug_smooth:
            return self.forward_augmentation_smoothing(input_tensor, targets, eigen_smooth)
        return self.forward(input_tensor, targets, eigen_smooth)

    def release(self) -> None:
        """Nothing to release (fastxai registers no hooks); kept for API compatibility."""
        self.outputs = None

    def __enter__(self) -> BaseCAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class GradCAM(BaseCAM):
    method = methods.gradcam


class GradCAMPlusPlus(BaseCAM):
    method = methods.gradcampp


class XGradCAM(BaseCAM):
    method = methods.xgradcam


class LayerCAM(BaseCAM):
    method = methods.layercam


class HiResCAM(BaseCAM):
    method = methods.hirescam


class EigenCAM(BaseCAM):
    method = methods.eigencam

    def _explain(self, x: Tensor, targets: Any, eigen_smooth: bool) -> Explanation:
        return super()._explain(x, targets, eigen_smooth=False)  # already a projection


class _PerturbationCAM(BaseCAM):
    """Methods that run many perturbed forwards honour ``batch_size`` (None: chosen by memory)."""

    def _method_options(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size}


class ScoreCAM(_PerturbationCAM):
    method = methods.scorecam


class AblationCAM(_PerturbationCAM):
    method = methods.ablationcam

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform | None = None,
        ablation_layer: nn.Module | None = None,
        batch_size: int | None = None,
        ratio_channels_to_ablate: float = 1.0,
    ) -> None:
        super().__init__(model, target_layers, reshape_transform)
        if ablation_layer is not None:
            raise ValueError(
                "ablation_layer: fastxai ablates channels itself (set to 0, suffix-only re-runs); "
                "custom ablation layers are not supported"
            )
        if ratio_channels_to_ablate != 1.0:
            raise ValueError(
                "ratio_channels_to_ablate: only 1.0 (every channel) is supported; fastxai "
                "re-runs only the network after the layer, so ablating all channels is cheap"
            )
        self.batch_size = batch_size


__all__ = [
    "AblationCAM",
    "BaseCAM",
    "EigenCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "ScoreCAM",
    "XGradCAM",
]
