"""Initial relevance at the last convolutional unit (the classifier heads) and the contrastive rule.

* ResNet (``"fc"``, the paper's): :math:`R(p) = (w_c \\cdot x_p + b_c) / n` at the ``n``
  positions of layer4's output, the per-position share of logit ``c``; it sums to the logit.
* VGG ``"gradcam"`` (the paper's and the official code's start): the Grad-CAM map
  :math:`\\mathrm{ReLU}(\\sum_k \\overline{\\partial y_c / \\partial A_k} A_k)` with ``A`` the
  pre-activation of the last convolutional unit (``features.28`` in vgg16), placed on that unit's
  post-ReLU output (``features.29``).
* VGG ``"pure_srd"`` (**not** the paper's setting): the classifier is decomposed with the same
  rule: the last Linear gives :math:`w_c \\cdot v + b_c` to the single PFV it reads, each
  ``Linear -> ReLU`` is a unit on a 1 x 1 map, and the first Linear, with the adaptive average
  pool folded into it, is a unit whose kernel covers the whole max-pooled map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastxai.decomposition.trace import LinearSource, Pair, Trace, Unit

UnitBackward = Callable[[Unit, Tensor], list[tuple[str, Tensor]]]


def propagate(
    units: list[Unit], relevance: dict[str, Tensor], unit_backward: UnitBackward
) -> dict[str, Tensor]:
    """Run ``unit_backward`` over ``units`` in reverse order from the given slot relevances.

    Units whose output slot has no relevance yet are skipped (an ERF started inside the network).
    Returns every slot's relevance; a slot read by several sources gets the sum.
    """
    relevance = dict(relevance)
    for unit in reversed(units):
        r_out = relevance.get(unit.name)
        if r_out is None:
            continue
        for slot, r_in in unit_backward(unit, r_out):
            relevance[slot] = r_in if slot not in relevance else relevance[slot] + r_in
    return relevance


def contrastive(relevance: Tensor) -> Tensor:
    """:math:`R - \\mathrm{mean}(R)` per image (the official code takes one mean over the whole
    batch; per image makes a batch equal to a loop over its images)."""
    return relevance - relevance.mean((-2, -1), keepdim=True)


def resnet_head(trace: Trace, classes: Tensor) -> Tensor:
    """:math:`R(p) = (w_c \\cdot x_p + b_c) / n` at layer4's output, ``(N, h, w)``."""
    assert trace.fc_weight is not None
    features = trace.features
    n = features.shape[-2] * features.shape[-1]
    relevance = torch.einsum("nchw,nc->nhw", features, trace.fc_weight[classes])
    if trace.fc_bias is not None:
        relevance = relevance + trace.fc_bias[classes][:, None, None]
    return relevance / n


def adaptive_pool_matrix(in_size: Pair, out_size: Pair, like: Tensor) -> Tensor:
    """``(out_h * out_w, in_h * in_w)`` matrix of ``F.adaptive_avg_pool2d`` on one channel."""
    cells = in_size[0] * in_size[1]
    basis = torch.eye(cells, dtype=like.dtype, device=like.device).view(cells, 1, *in_size)
    return F.adaptive_avg_pool2d(basis, out_size).reshape(cells, -1).T


def _last_unit_gradient(trace: Trace, classes: Tensor) -> Tensor:
    """:math:`\\partial y_c / \\partial \\hat v` at the last convolutional unit, in closed form:
    back through the Linear/ReLU classifier, the adaptive average pool, the max-pool and the
    ReLU (no autograd, so it also runs under ``torch.inference_mode``)."""
    head = trace.vgg
    assert head is not None
    last = head.linears[-1]
    grad = last.weight[classes]  # (N, in_features)
    for layer in reversed(head.linears[:-1]):
        grad = grad * (layer.preact > 0)
        grad = grad @ layer.weight
    n, channels = trace.features.shape[:2]
    pool_matrix = adaptive_pool_matrix(head.pooled_size, head.avgpool_size, grad)
    grad = grad.view(n, channels, -1) @ pool_matrix  # adjoint of the average pool
    grad = grad.view(n, channels, *head.pooled_size)
    if head.final_pool is not None:
        pool = head.final_pool
        full = grad.new_zeros(n, channels, pool.input_size[0] * pool.input_size[1])
        full.scatter_add_(2, pool.indices.flatten(2), grad.flatten(2))
        grad = full.view(n, channels, *pool.input_size)
    preact = trace.units[-1].preact
    return grad * (preact > 0)


def vgg_gradcam_head(trace: Trace, classes: Tensor) -> Tensor:
    """Grad-CAM of the last convolutional unit's pre-activation, ``(N, h, w)``."""
    preact = trace.units[-1].preact
    weights = _last_unit_gradient(trace, classes).mean((2, 3))
    return torch.einsum("nchw,nc->nhw", preact, weights).clamp_min(0)


def vgg_classifier_units(trace: Trace) -> list[Unit]:
    """The classifier's ``Linear -> ReLU`` layers as units on 1 x 1 maps (forward order).

    The first reads the last convolutional output through the final max-pool (merged as in the
    body) and the adaptive average pool (folded into its weight: a kernel the size of the pooled
    map).
    """
    head = trace.vgg
    assert head is not None
    units: list[Unit] = []
    slot = trace.head_slot
    channels = trace.features.shape[1]
    for index, layer in enumerate(head.linears[:-1]):
        if layer.relu_slot is None:
            raise TypeError(
                "srd: the pure_srd head needs every classifier Linear but the last to be "
                "followed by a ReLU"
            )
        preact = layer.preact[:, :, None, None]
        if index == 0:
            pool_matrix = adaptive_pool_matrix(head.pooled_size, head.avgpool_size, layer.weight)
            per_cell = layer.weight.view(layer.weight.shape[0], channels, -1)
            if pool_matrix.shape[0] == pool_matrix.shape[1] and bool(
                (pool_matrix == torch.eye(pool_matrix.shape[0], device=pool_matrix.device)).all()
            ):
                folded = per_cell
            else:
                folded = per_cell @ pool_matrix
            weight = folded.reshape(layer.weight.shape[0], channels, *head.pooled_size)
            pool = head.final_pool
            inputs = trace.features if pool is None else pool.pooled
        else:
            weight = layer.weight[:, :, None, None]
            pool = None
            inputs = layer.inputs[:, :, None, None]
        source = LinearSource(slot=slot, inputs=inputs, weight=weight, shift=layer.bias, pool=pool)
        units.append(Unit(layer.relu_slot, preact, [source]))
        slot = layer.relu_slot
    return units


def vgg_pure_head(
    trace: Trace, classes: Tensor, unit_backward: UnitBackward
) -> tuple[Tensor, dict[str, Tensor]]:
    """Decompose the classifier down to the last convolutional output: ``(N, h, w)`` and the
    relevance at every classifier ReLU."""
    head = trace.vgg
    assert head is not None
    units = vgg_classifier_units(trace)
    if not units:
        raise TypeError("srd: the pure_srd head needs a Linear -> ReLU before the logits")
    last = head.linears[-1]
    start = torch.einsum("nc,nc->n", last.inputs, last.weight[classes])
    if last.bias is not None:
        start = start + last.bias[classes]
    relevance = propagate(units, {units[-1].name: start[:, None, None]}, unit_backward)
    return relevance.pop(trace.head_slot), relevance
