"""Convolution + BatchNorm folded into one affine map, parameters detached."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastxai.decomposition.gates import pair
from fastxai.decomposition.support import unsupported
from fastxai.decomposition.trace import LinearSource, PoolRouting


def fold_conv_bn(
    conv: nn.Conv2d, bn: nn.BatchNorm2d | None, name: str
) -> tuple[Tensor, Tensor | None]:
    r"""``(W', beta)`` with :math:`\mathrm{BN}(\mathrm{conv}(v)) = \mathrm{conv}(v, W') + \beta`.

    :math:`\tilde\gamma = \gamma / \sqrt{\sigma^2 + \epsilon}`, :math:`W' = \tilde\gamma \odot W`,
    :math:`\beta = b_{BN} + \tilde\gamma \odot (b_{conv} - \mu)`. The official code leaves
    :math:`\epsilon` out of :math:`\beta` (a 1e-7 effect); keeping it makes the sources sum
    exactly to :math:`\hat v`, so every unit conserves relevance.
    """
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise unsupported(
            f"{name} ({type(conv).__name__} with padding={conv.padding!r}, "
            f"padding_mode={conv.padding_mode!r}); only explicit zero padding"
        )
    weight = conv.weight.detach()
    bias = None if conv.bias is None else conv.bias.detach()
    if bn is None:
        return weight, bias
    if bn.running_mean is None or bn.running_var is None:
        raise unsupported(f"{name} (BatchNorm2d without running statistics)")
    scale = torch.rsqrt(bn.running_var.detach() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
    shift = -bn.running_mean.detach() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    if bias is not None:
        shift = shift + scale * bias
    return weight * scale[:, None, None, None], shift


def conv_source(
    slot: str,
    inputs: Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d | None,
    name: str,
    pool: PoolRouting | None = None,
) -> tuple[LinearSource, Tensor]:
    """Record ``[pool ->] conv -> [BN]`` reading ``inputs``; return the source and its output."""
    weight, shift = fold_conv_bn(conv, bn, name)
    source = LinearSource(
        slot=slot,
        inputs=inputs,
        weight=weight,
        shift=shift,
        stride=pair(conv.stride),
        padding=pair(conv.padding),
        dilation=pair(conv.dilation),
        groups=conv.groups,
        pool=pool,
    )
    out = F.conv2d(
        inputs, weight, shift, source.stride, source.padding, source.dilation, source.groups
    )
    return source, out
