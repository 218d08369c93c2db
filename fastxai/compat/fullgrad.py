"""FullGrad (Srinivas and Fleuret, 2019), as pytorch-grad-cam computes it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastxai._checks import check_images, check_model, warn_user
from fastxai._modes import evaluated, keeps_buffers
from fastxai.capture import ReshapeTransform
from fastxai.compat._base import BaseCAM
from fastxai.explanation import Explanation
from fastxai.methods._projection import SvdSign, first_component_projection
from fastxai.ops.reference import minmax
from fastxai.targets import resolve_targets


def has_2d_bias(module: nn.Module) -> bool:
    """A ``Conv2d`` or ``BatchNorm2d`` (exactly those types) with a bias."""
    return type(module) in (nn.Conv2d, nn.BatchNorm2d) and module.bias is not None


def effective_bias(module: nn.Module) -> Tensor:
    r"""The bias the layer adds: a convolution's own; eval-mode BatchNorm's
    :math:`\beta - \mu \gamma / \sqrt{\sigma^2 + \epsilon}`."""
    if isinstance(module, nn.BatchNorm2d):
        if module.running_mean is None or module.running_var is None:
            raise ValueError(
                "model: FullGrad needs BatchNorm2d running statistics (track_running_stats=True)"
            )
        scale = module.weight / torch.sqrt(module.running_var + module.eps)
        return (module.bias - module.running_mean * scale).detach()
    return module.bias.detach()


def _resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``(N, C, h, w)`` bilinear, half-pixel centres, no anti-aliasing."""
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


class FullGrad(BaseCAM):
    r"""FullGrad: the input-gradient term plus every bias-gradient term, each min-max normalised.

    :math:`M = \mathrm{mm}\big(\sum_c \mathrm{mm}(|x \odot \partial y / \partial x|_c) +
    \sum_{l} \mathrm{up}(\sum_c \mathrm{mm}(|b_{l,c}\, \partial y / \partial z_{l,c}|))\big)`
    over every ``Conv2d`` / ``BatchNorm2d`` layer :math:`l` with a bias :math:`b_l` (output
    :math:`z_l`), with :math:`\mathrm{mm}` the per-map min-max (:math:`+10^{-7}`) and
    :math:`\mathrm{up}` bilinear upsampling (applied after the channel sum, which it commutes
    with). ``target_layers`` is ignored (every bias layer is used). Each layer's gradient is
    paired with that layer's own bias; biases are read at call time.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module] = (),
        reshape_transform: ReshapeTransform | None = None,
        *,
        svd_sign: SvdSign = "largest_positive",
    ) -> None:
        if len(target_layers) > 0:
            warn_user("target_layers is ignored in FullGrad: every bias layer is used instead")
        layers = [m for m in model.modules() if has_2d_bias(m)]
        if not layers:
            raise ValueError("model: FullGrad needs Conv2d or BatchNorm2d layers with a bias")
        super().__init__(
            model, layers, reshape_transform, compute_input_gradient=True, svd_sign=svd_sign
        )

    def _gradients(self, x: Tensor, targets: Any) -> tuple[Tensor, list[Tensor], Any, Tensor]:
        """Input gradient, one gradient per bias-layer call, resolved targets and logits."""
        kept: list[tuple[nn.Module, Tensor]] = []

        def keep(module: nn.Module, _inputs: Any, output: Tensor) -> Tensor:
            kept.append((module, output))
            return output.clone()  # a later in-place ReLU must not overwrite the kept output

        leaf = x.detach().requires_grad_(True)
        handles = [m.register_forward_hook(keep) for m in dict.fromkeys(self.target_layers)]
        try:
            with torch.enable_grad():
                logits = self.model(leaf)
                resolved = resolve_targets(targets, logits.detach())
                total = resolved.scores(logits).sum()
                grads = torch.autograd.grad(total, [leaf, *(out for _, out in kept)])
        finally:
            for handle in handles:
                handle.remove()
        layer_grads = []
        for (module, _), grad in zip(kept, grads[1:], strict=True):
            if self.reshape_transform is not None:
                grad = self.reshape_transform(grad)
            layer_grads.append(effective_bias(module).double()[None, :, None, None] * grad)
        return grads[0], layer_grads, resolved, logits.detach()

    @keeps_buffers
    def _explain(self, x: Tensor, targets: Any, eigen_smooth: bool) -> Explanation:
        check_model(self.model)
        check_images(self.model, x)
        size = (x.shape[2], x.shape[3])
        with evaluated(self.model):
            input_grad, bias_grads, resolved, logits = self._gradients(
                x, self._targets(targets, x.shape[0])
            )
        input_term = minmax((input_grad.double() * x.double()).abs())
        layer_terms = [_resize(minmax(g.abs()).sum(1, keepdim=True), size) for g in bias_grads]
        if eigen_smooth:
            self._warn_of_svd_sign()
            # pytorch-grad-cam projects every term at 1/8 of the input size
            terms = torch.cat([input_term, *layer_terms], 1)
            small = _resize(minmax(terms), (size[0] // 8, size[1] // 8))
            projection = first_component_projection(small, self.svd_sign)
            raw = _resize(minmax(projection[:, None]), size)[:, 0]
        else:
            raw = input_term.sum(1) + sum(t[:, 0] for t in layer_terms)
        maps = minmax(raw).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        self.outputs = logits
        return Explanation(
            maps=maps,
            targets=resolved.classes,
            logits=logits,
            raw=raw,
            extras={"method": "fullgrad"},
        )
