"""pytorch-grad-cam's CAM classes, each around one fastxai method (or a ``BaseCAM`` hook)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn

from fastxai import methods
from fastxai.capture import ReshapeTransform
from fastxai.compat._base import BaseCAM
from fastxai.compat._differences import SVD_SIGN, warn_once
from fastxai.explanation import Explanation


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


class GradCAMElementWise(BaseCAM):
    method = methods.gradcamelementwise


class ShapleyCAM(BaseCAM):
    """Needs a model that torch.fx can split at the layer (the Hessian term differentiates the
    network after the layer twice)."""

    method = methods.shapleycam

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform | None = None,
    ) -> None:
        super().__init__(
            model, target_layers, reshape_transform, compute_input_gradient=True, detach=False
        )


class _ProjectionCAM(BaseCAM):
    """The map already is a projection: ``eigen_smooth`` changes nothing (as in
    pytorch-grad-cam, whose ``get_cam_image`` ignores it)."""

    def _explain(self, x: Tensor, targets: Any, eigen_smooth: bool) -> Explanation:
        return super()._explain(x, targets, eigen_smooth=False)


class EigenCAM(_ProjectionCAM):
    method = methods.eigencam

    def _explain(self, x: Tensor, targets: Any, eigen_smooth: bool) -> Explanation:
        warn_once(SVD_SIGN)
        return super()._explain(x, targets, eigen_smooth)

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform | None = None,
    ) -> None:
        super().__init__(model, target_layers, reshape_transform, uses_gradients=False)


class EigenGradCAM(_ProjectionCAM):
    method = methods.eigengradcam

    def _explain(self, x: Tensor, targets: Any, eigen_smooth: bool) -> Explanation:
        warn_once(SVD_SIGN)
        return super()._explain(x, targets, eigen_smooth)


class KPCA_CAM(_ProjectionCAM):
    method = methods.kpcacam

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform | None = None,
        kernel: str = "sigmoid",
        gamma: float | None = None,
    ) -> None:
        super().__init__(model, target_layers, reshape_transform, uses_gradients=False)
        self.kernel = kernel
        self.gamma = gamma

    def _method_options(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "gamma": self.gamma}


class RandomCAM(BaseCAM):
    """Weights drawn from NumPy's global generator (as pytorch-grad-cam draws them), so
    ``np.random.seed`` gives the same maps in both; :func:`fastxai.randomcam` draws from torch."""

    method = methods.randomcam

    def get_cam_weights(
        self,
        input_tensor: Tensor,
        target_layer: nn.Module,
        targets: Any,
        activations: Any,
        grads: Any,
    ) -> np.ndarray:
        """:math:`w \\sim \\mathcal{U}(-1, 1)` of shape ``(N, C)``."""
        return np.random.uniform(-1, 1, size=(activations.shape[0], activations.shape[1]))


class _PerturbationCAM(BaseCAM):
    """Methods that run many perturbed forwards honour ``batch_size`` (None: chosen by memory)."""

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform | None = None,
    ) -> None:
        super().__init__(model, target_layers, reshape_transform, uses_gradients=False)

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
