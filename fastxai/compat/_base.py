"""pytorch-grad-cam's ``BaseCAM``: the constructor, the call and the subclass hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from fastxai._checks import model_device
from fastxai._modes import evaluated
from fastxai.capture import LayerCapture, ReshapeTransform
from fastxai.compat._differences import ONE_TARGET_FOR_A_BATCH, SVD_SIGN, warn_once
from fastxai.compat.utils.model_targets import ClassifierOutputTarget
from fastxai.explanation import Explanation
from fastxai.methods._base import explain_layers
from fastxai.methods._projection import SvdSign, check_svd_sign, first_component_projection

# ttach's default in pytorch-grad-cam: horizontal flip x multiply by {0.9, 1, 1.1}
_AUGMENTATIONS = [(flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1)]


class BaseCAM:
    """A pytorch-grad-cam style explainer.

    A fastxai class names its functional method in ``method``. A subclass that overrides
    ``get_cam_weights`` (channel weights ``(N, C)`` from the layer's activations and gradients)
    or ``get_cam_image`` (the raw map ``(N, h, w)``) gets maps built from what it returns, as in
    pytorch-grad-cam; both receive NumPy arrays (tensors with ``detach=False``).

    ``svd_sign`` (keyword only, not in pytorch-grad-cam) fixes the arbitrary sign of the
    principal component of ``eigen_smooth`` and the Eigen methods: ``"largest_positive"``
    (default: the largest-magnitude value of the projection positive) or ``"numpy"``
    (pytorch-grad-cam's: the sign NumPy's float32 SVD gives, so the maps equal its maps).
    """

    method: ClassVar[Callable[..., Explanation] | None] = None

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform | None = None,
        compute_input_gradient: bool = False,
        uses_gradients: bool = True,
        tta_transforms: Any = None,
        detach: bool = True,
        *,
        svd_sign: SvdSign = "largest_positive",
    ) -> None:
        if not isinstance(target_layers, (list, tuple)) or not target_layers:
            raise ValueError("target_layers must be a non-empty list of modules")
        check_svd_sign(svd_sign)
        self.svd_sign = svd_sign
        self.model = model
        self.target_layers = list(target_layers)
        self.reshape_transform = reshape_transform
        # Accepted for pytorch-grad-cam's signature: fastxai never needs the input's gradient.
        self.compute_input_gradient = compute_input_gradient
        self.uses_gradients = uses_gradients
        self.tta_transforms = tta_transforms
        self.detach = detach
        self.outputs: Tensor | None = None
        self.batch_size: int | None = None

    @property
    def device(self) -> torch.device:
        """The model's device (inputs are moved there)."""
        return model_device(self.model) or torch.device("cpu")

    def get_cam_weights(
        self,
        input_tensor: Tensor,
        target_layer: nn.Module,
        targets: list[Callable],
        activations: Any,
        grads: Any,
    ) -> np.ndarray:
        """Channel weights ``(N, C)``; override in a subclass (pytorch-grad-cam's hook)."""
        raise NotImplementedError(
            f"{type(self).__name__}: a BaseCAM subclass overrides get_cam_weights (or "
            "get_cam_image), as in pytorch-grad-cam, or sets `method` to a fastxai method"
        )

    def get_cam_image(
        self,
        input_tensor: Tensor,
        target_layer: nn.Module,
        targets: list[Callable],
        activations: Any,
        grads: Any,
        eigen_smooth: bool = False,
    ) -> np.ndarray:
        r"""Raw map ``(N, h, w)``: :math:`\sum_k w_k A_k` with :math:`w` from
        :meth:`get_cam_weights`, or its first principal component with ``eigen_smooth``."""
        weights = self.get_cam_weights(input_tensor, target_layer, targets, activations, grads)
        a = torch.as_tensor(activations)
        weighted = torch.as_tensor(np.asarray(weights), device=a.device)[:, :, None, None] * a
        if eigen_smooth:
            return first_component_projection(weighted, self.svd_sign).cpu().numpy()
        return weighted.sum(1).cpu().numpy()

    def _uses_hooks(self) -> bool:
        """True where maps come from the subclass's ``get_cam_weights`` / ``get_cam_image``."""
        cls = type(self)
        return (
            cls.method is None
            or cls.get_cam_weights is not BaseCAM.get_cam_weights
            or cls.get_cam_image is not BaseCAM.get_cam_image
        )

    def _method_options(self) -> dict[str, Any]:
        return {}

    def _targets(self, targets: Sequence[Callable] | None, n: int) -> Any:
        if targets is None:
            return None
        targets = list(targets)
        if len(targets) == 1 and n > 1:
            warn_once(ONE_TARGET_FOR_A_BATCH)
            return targets * n
        return targets

    def _hook_contributions(
        self, layers: Iterator[nn.Module], x: Tensor, targets: Any, eigen_smooth: bool
    ) -> Callable[..., tuple[Tensor, None]]:
        def contributions(
            cap: LayerCapture, model: nn.Module, images: Tensor
        ) -> tuple[Tensor, None]:
            activations, grads = cap.activation, cap.gradient
            if self.detach:
                activations = activations.cpu().numpy()
                grads = None if grads is None else grads.cpu().numpy()
            chosen = targets
            if chosen is None:
                chosen = [ClassifierOutputTarget(int(c)) for c in cap.targets.classes.tolist()]
            raw = self.get_cam_image(x, next(layers), chosen, activations, grads, eigen_smooth)
            return torch.as_tensor(np.asarray(raw), device=cap.activation.device)[:, None], None

        return contributions

    def _warn_of_svd_sign(self) -> None:
        if self.svd_sign == "largest_positive":
            warn_once(SVD_SIGN)

    def _explain(self, x: Tensor, targets: Any, eigen_smooth: bool) -> Explanation:
        if eigen_smooth:
            self._warn_of_svd_sign()
        targets = self._targets(targets, x.shape[0])
        with evaluated(self.model):
            if self._uses_hooks():
                explanation = explain_layers(
                    self.model,
                    x,
                    self.target_layers,
                    targets,
                    self._hook_contributions(iter(self.target_layers), x, targets, eigen_smooth),
                    method=type(self).__name__,
                    with_gradient=self.uses_gradients,
                    reshape_transform=self.reshape_transform,
                )
            else:
                explanation = type(self).method(
                    self.model,
                    x,
                    self.target_layers,
                    targets,
                    reshape_transform=self.reshape_transform,
                    eigen_smooth=eigen_smooth,
                    svd_sign=self.svd_sign,
                    **self._method_options(),
                )
        self.outputs = explanation.logits
        return explanation

    def forward(
        self, input_tensor: Tensor, targets: Sequence[Callable] | None, eigen_smooth: bool = False
    ) -> np.ndarray:
        return self._explain(self._on_model_device(input_tensor), targets, eigen_smooth).numpy()

    def _on_model_device(self, input_tensor: Tensor) -> Tensor:
        device = model_device(self.model)
        return input_tensor if device is None else input_tensor.to(device)

    def forward_augmentation_smoothing(
        self, input_tensor: Tensor, targets: Sequence[Callable] | None, eigen_smooth: bool = False
    ) -> np.ndarray:
        """Mean of the maps of the augmented copies, each mapped back (not rescaled): ttach's
        ``tta_transforms`` when given, else the 6 flipped / scaled copies."""
        if self.tta_transforms is not None:
            return self._custom_augmentation_smoothing(input_tensor, targets, eigen_smooth)
        x = self._on_model_device(input_tensor)
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

    def _custom_augmentation_smoothing(
        self, input_tensor: Tensor, targets: Sequence[Callable] | None, eigen_smooth: bool
    ) -> np.ndarray:
        cams = []
        for transform in self.tta_transforms:
            augmented = transform.augment_image(input_tensor)
            cam = torch.from_numpy(self.forward(augmented, targets, eigen_smooth))
            cams.append(transform.deaugment_mask(cam[:, None])[:, 0].numpy())
        return np.mean(np.float32(cams), axis=0)

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


class WrappingCAM:
    """Base of the classes that run other compat CAMs (``FinerCAM``, ``SESS``, ``RefineCAM``):
    ``cam(...)`` is ``cam.forward(...)``, and ``release`` (also on leaving a ``with`` block)
    releases every wrapped CAM, listed by :meth:`wrapped_cams`."""

    def wrapped_cams(self) -> list[BaseCAM]:
        return [self.base_cam]

    def __call__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        return self.forward(*args, **kwargs)

    def release(self) -> None:
        for cam in self.wrapped_cams():
            cam.release()

    def __enter__(self) -> WrappingCAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
