"""pytorch-grad-cam's CAM classes, each around one fastxai method (or a ``BaseCAM`` hook)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastxai import methods
from fastxai.capture import ReshapeTransform
from fastxai.compat._base import BaseCAM
from fastxai.compat.ablation_layer import channels_to_ablate
from fastxai.compat.pyramid_ablation import captured_pyramid, pyramid_ablation_scores
from fastxai.explanation import Explanation
from fastxai.methods._projection import SvdSign


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
    """The Hessian term differentiates the network after the layer twice (the whole model, with
    the layer's output replaced, where torch.fx cannot split it at the layer)."""

    method = methods.shapleycam

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform | None = None,
        *,
        svd_sign: SvdSign = "largest_positive",
    ) -> None:
        super().__init__(
            model,
            target_layers,
            reshape_transform,
            compute_input_gradient=True,
            detach=False,
            svd_sign=svd_sign,
        )


class _ProjectionCAM(BaseCAM):
    """``eigen_smooth`` changes nothing (as in pytorch-grad-cam, whose ``get_cam_image`` of
    these classes ignores it; the map mostly already is a projection)."""

    def _explain(self, x: Tensor, targets: Any, eigen_smooth: bool) -> Explanation:
        return super()._explain(x, targets, eigen_smooth=False)


class EigenCAM(_ProjectionCAM):
    """``svd_sign="numpy"`` gives pytorch-grad-cam's maps (see :class:`BaseCAM`)."""

    method = methods.eigencam

    def _explain(self, x: Tensor, targets: Any, eigen_smooth: bool) -> Explanation:
        self._warn_of_svd_sign()
        return super()._explain(x, targets, eigen_smooth)

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform | None = None,
        *,
        svd_sign: SvdSign = "largest_positive",
    ) -> None:
        super().__init__(
            model, target_layers, reshape_transform, uses_gradients=False, svd_sign=svd_sign
        )


class EigenGradCAM(_ProjectionCAM):
    """``svd_sign="numpy"`` gives pytorch-grad-cam's maps (see :class:`BaseCAM`)."""

    method = methods.eigengradcam

    def _explain(self, x: Tensor, targets: Any, eigen_smooth: bool) -> Explanation:
        self._warn_of_svd_sign()
        return super()._explain(x, targets, eigen_smooth)


class SegEigenCAM(_ProjectionCAM):
    """Its sign is fixed as pytorch-grad-cam fixes it (largest-magnitude value positive)."""

    method = methods.segeigencam


class FEM(_ProjectionCAM):
    """``k``: the threshold's number of standard deviations above each channel's mean."""

    method = methods.fem

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform | None = None,
        k: float = 2,
    ) -> None:
        super().__init__(model, target_layers, reshape_transform, uses_gradients=False)
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ValueError(f"k must be a number of standard deviations, got {k!r}")
        self.k = k

    def _method_options(self) -> dict[str, Any]:
        return {"k": self.k}


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
        *,
        svd_sign: SvdSign = "largest_positive",
    ) -> None:
        super().__init__(
            model, target_layers, reshape_transform, uses_gradients=False, svd_sign=svd_sign
        )

    def _method_options(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size}


class ScoreCAM(_PerturbationCAM):
    method = methods.scorecam


class AblationCAM(_PerturbationCAM):
    """pytorch-grad-cam's Ablation-CAM: ``ablation_layer`` (pytorch-grad-cam's or
    :mod:`fastxai.compat.ablation_layer`'s, by class name) says where the channels of the layer
    output are (``None``: chosen from the shapes, see :func:`fastxai.ablationcam`);
    ``ratio_channels_to_ablate`` < 1 ablates only pytorch-grad-cam's selection of channels
    (:func:`fastxai.compat.ablation_layer.channels_to_ablate`), the others weigh 0.
    ``AblationLayerFasterRCNN`` ablates a detector's feature pyramid as pytorch-grad-cam does
    (:mod:`fastxai.compat.pyramid_ablation`; ``batch_size`` None: 32 copies per run). Where the
    network after the layer cannot run on its own (a model torch.fx cannot trace, such as
    timm's ViT) the whole model re-runs on each batch of ablated copies, as in
    pytorch-grad-cam."""

    method = methods.ablationcam

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform | None = None,
        ablation_layer: object | None = None,
        batch_size: int | None = None,
        ratio_channels_to_ablate: float = 1.0,
        *,
        svd_sign: SvdSign = "largest_positive",
    ) -> None:
        super().__init__(model, target_layers, reshape_transform, svd_sign=svd_sign)
        self.ablation_layer = ablation_layer
        self.ablates_pyramid = type(ablation_layer).__name__ == "AblationLayerFasterRCNN"
        self.channel_axis = None if self.ablates_pyramid else _channel_axis_of_layer(ablation_layer)
        ratio = ratio_channels_to_ablate
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ValueError(f"ratio_channels_to_ablate must be in [0, 1], got {ratio!r}")
        self.ratio_channels_to_ablate = ratio
        self.batch_size = batch_size

    def _uses_hooks(self) -> bool:
        """The pyramid ablation runs as pytorch-grad-cam's hook (:meth:`get_cam_weights`)."""
        cls = type(self)
        return (
            self.ablates_pyramid
            or cls.get_cam_weights is not AblationCAM.get_cam_weights
            or cls.get_cam_image is not BaseCAM.get_cam_image
        )

    def get_cam_weights(
        self,
        input_tensor: Tensor,
        target_layer: nn.Module,
        targets: Any,
        activations: Any,
        grads: Any,
    ) -> np.ndarray:
        r"""With ``AblationLayerFasterRCNN``: :math:`w_k = (y - y_k) / y`, :math:`y_k` the score
        with channel ``k`` of the feature pyramid set to -1000 (pytorch-grad-cam's value), 0
        for the channels ``ratio_channels_to_ablate`` leaves out. ``(N, C)`` float32."""
        if not self.ablates_pyramid:
            raise NotImplementedError(
                "AblationCAM computes its weights in fastxai.ablationcam; get_cam_weights is "
                "its hook for AblationLayerFasterRCNN only"
            )
        pyramid, outputs = captured_pyramid(self.model, target_layer, input_tensor)
        activation = torch.as_tensor(activations)
        n, c = activation.shape[:2]
        width = sum(level.shape[1] for level in pyramid.values())
        if width != c:
            raise ValueError(
                f"reshape_transform: the feature pyramid has {width} channels in all, the "
                f"reshaped activation {c}; AblationLayerFasterRCNN needs the levels' channels "
                "concatenated (fasterrcnn_reshape_transform)"
            )
        pairs = zip(targets, outputs, strict=True)
        original = torch.stack([score(output).reshape(()).float().cpu() for score, output in pairs])
        if self.ratio_channels_to_ablate < 1:
            chosen = channels_to_ablate(activation, self.ratio_channels_to_ablate).cpu()
        else:
            chosen = torch.arange(c).repeat(n, 1)
        ablated = pyramid_ablation_scores(
            self.model, target_layer, input_tensor, pyramid, targets, chosen, self.batch_size
        )
        scores = original[:, None].repeat(1, c).scatter(1, chosen, ablated)
        return ((original[:, None] - scores) / original[:, None]).numpy()

    def _method_options(self) -> dict[str, Any]:
        select = None
        if self.ratio_channels_to_ablate < 1:
            select = functools.partial(channels_to_ablate, ratio=self.ratio_channels_to_ablate)
        return {
            "batch_size": self.batch_size,
            "channel_axis": self.channel_axis,
            "select_channels": select,
        }


def _channel_axis_of_layer(ablation_layer: object | None) -> int | None:
    if ablation_layer is None:
        return None
    name = type(ablation_layer).__name__
    if name not in _CHANNEL_AXES:
        raise ValueError(
            "ablation_layer: expected AblationLayer(), AblationLayerVit() or "
            "AblationLayerFasterRCNN() (pytorch-grad-cam's "
            f"or fastxai.compat.ablation_layer's), got {name}; fastxai ablates channels itself "
            "(set to 0)"
        )
    return _CHANNEL_AXES[name]


_CHANNEL_AXES = {"AblationLayer": 1, "AblationLayerVit": -1}
