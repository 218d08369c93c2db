"""What the forward pass of SRD records: units, their linear sources, and merged max-pools.

A *unit* is ``[MaxPool] -> Conv (or Linear) -> [BN] -> [+ shortcut] -> ReLU``. Its pre-activation
:math:`\\hat v` (the ReLU input, after BN and the residual add) defines the sharing ratios; its
post-ReLU output carries one relevance scalar per pointwise feature vector (PFV), stored under the
unit's *slot* name. Every linear source of a unit is recorded with BatchNorm folded in
(:math:`W' = \\tilde\\gamma \\odot W`, shift :math:`\\beta`), so the sources sum exactly to
:math:`\\hat v`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

Pair = tuple[int, int]


@dataclass
class PoolRouting:
    """A max-pool merged into the linear map that reads it.

    Attributes:
        pooled: ``(N, C, Hu, Wu)`` pooled map (what the next linear map reads).
        indices: ``(N, C, Hu, Wu)`` flat index ``row * W + col`` of each element's arg-max in
            the pool input.
        input_size: ``(H, W)`` of the pool input (the post-ReLU map carrying relevance).
        kernel_size, stride, padding, dilation: the pool's geometry (``ceil_mode=False``).
    """

    pooled: Tensor
    indices: Tensor
    input_size: Pair
    kernel_size: Pair
    stride: Pair
    padding: Pair
    dilation: Pair


@dataclass
class LinearSource:
    """One linear path from a relevance slot into a unit's pre-activation.

    ``weight is None`` is an identity shortcut (:math:`c = x_q`, no bias).

    Attributes:
        slot: name of the post-activation map the relevance flows back to.
        inputs: the map the linear map reads: the slot's activation, or ``pool.pooled``.
        weight: BN-scaled convolution weight ``(C_out, C_in / groups, kh, kw)`` or ``None``.
        shift: per-output-channel shift :math:`\\beta` ``(C_out,)`` or ``None`` (zero).
        stride, padding, dilation, groups: convolution geometry.
        pool: the merged max-pool between ``slot`` and ``inputs``, or ``None``.
    """

    slot: str
    inputs: Tensor
    weight: Tensor | None
    shift: Tensor | None = None
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1
    pool: PoolRouting | None = None


@dataclass
class Unit:
    """``name`` is the slot of the unit's post-ReLU output; ``preact`` is :math:`\\hat v`."""

    name: str
    preact: Tensor
    sources: list[LinearSource]


@dataclass
class LinearLayer:
    """A classifier ``Linear`` as recorded by the forward pass.

    Attributes:
        weight, bias: the layer's (detached) parameters.
        inputs: ``(N, in_features)`` what it read.
        preact: ``(N, out_features)`` its output.
        relu_slot: name of the ReLU after it (``None`` for the last layer, the logits).
    """

    weight: Tensor
    bias: Tensor | None
    inputs: Tensor
    preact: Tensor
    relu_slot: str | None


@dataclass
class VGGHeadInputs:
    """What the VGG heads need beyond the convolutional units.

    Attributes:
        final_pool: the max-pool after the last convolutional unit, or ``None``.
        pooled_size: ``(hp, wp)`` of the map entering the adaptive average pool.
        avgpool_size: output size of the adaptive average pool (``(7, 7)`` in torchvision).
        linears: the classifier's Linear layers in order; the last gives the logits.
    """

    final_pool: PoolRouting | None
    pooled_size: Pair
    avgpool_size: Pair
    linears: list[LinearLayer]


@dataclass
class Trace:
    """The recorded forward pass of a supported network.

    Attributes:
        arch: ``"resnet"`` or ``"vgg"``.
        units: the convolutional units in forward order (the stem first).
        head_slot: slot of the last convolutional unit's output, where the initial relevance lives.
        features: ``(N, C, h, w)`` activation at ``head_slot``.
        logits: ``(N, K)`` network output.
        fc_weight, fc_bias: ResNet's final Linear (``None`` for VGG).
        vgg: VGG classifier inputs (``None`` for ResNet).
        slot_sizes: spatial size of every slot, ``"input"`` included.
        aliases: other names accepted for a slot (``"layer4"`` -> ``"layer4.1"``, ...).
    """

    arch: Literal["resnet", "vgg"]
    units: list[Unit]
    head_slot: str
    features: Tensor
    logits: Tensor
    fc_weight: Tensor | None = None
    fc_bias: Tensor | None = None
    vgg: VGGHeadInputs | None = None
    slot_sizes: dict[str, Pair] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
