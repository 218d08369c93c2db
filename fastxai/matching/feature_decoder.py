"""A mask generator that reads the classifier's own features: the amortised mode's default.

One generator shared by every image has to tell *from the image* which pixels the classifier
relies on. A U-Net on raw pixels must learn that from scratch; trained over a few hundred
mini-batches of photos it settled at ``p = 0.5`` everywhere (benchmarks/README.md). The matched
layers' activations :math:`\\varphi_\\ell(x)` are computed once per image anyway (they are the
targets of :math:`L_{act}`), and they already say where the evidence is, so this generator
decodes the mask from them (a small top-down decoder, in the spirit of feature-pyramid heads and
of the real-time saliency models that reuse a classifier's encoder).

Architecture (width ``w``; layers ``l = 1..L`` with ``C_l`` channels at ``h_l x w_l``; decoder
resolution ``R``: the second-finest matched resolution, capped at 56):

.. math::
    z = \\mathrm{ReLU}\\Big(\\sum_l W_l * \\mathrm{resize}_R\\big(\\varphi_l(x) / \\mathrm{rms}(
    \\varphi_l(x))\\big) + W_x * \\mathrm{pool}_R(x)\\Big), \\quad
    \\mathrm{logits} = \\mathrm{up}_{H \\times W}\\big(K_2 * \\mathrm{ReLU}(K_1 * z)\\big) + b

with ``W_l`` and ``W_x`` 1x1 convolutions to ``w`` channels, ``K_1`` a 3x3 convolution
``w -> w`` and ``K_2`` a 3x3 convolution to one channel, ``rms`` taken per image over the whole
layer (so photos of any contrast give inputs of one scale), ``resize_R`` area pooling when larger
and bilinear when smaller, ``up`` bilinear. The head's bias starts at
``INITIAL_KEEP_LOGIT`` (``p = 0.88`` where the rest of the decoder gives 0, so at the start
(almost) every pixel is kept): from there the area term lowers ``p``
everywhere and the straight-through gradients of :math:`L_{CE}` and :math:`L_{rob}` (non-zero at
``e = x``, unlike :math:`L_{act}` and :math:`L_{KL}`) say which pixels to keep; starting at
``p = 0.5`` leaves every pixel on the threshold, where the shared U-Net stalled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DecoderParams = dict[str, Tensor]

INITIAL_KEEP_LOGIT = 2.0
MAX_RESOLUTION = 56


def decoder_resolution(feature_sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``R``: the second-finest of the matched layers' sizes (the finest when there is one),
    each side capped at ``MAX_RESOLUTION``."""
    by_area = sorted(set(feature_sizes), key=lambda s: -s[0] * s[1])
    height, width = by_area[1] if len(by_area) > 1 else by_area[0]
    return min(height, MAX_RESOLUTION), min(width, MAX_RESOLUTION)


def init_decoder_params(
    feature_channels: Sequence[int],
    *,
    in_channels: int = 3,
    width: int = 32,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DecoderParams:
    """The decoder's weights: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (PyTorch's default for
    ``nn.Conv2d``), drawn from ``seed``; the head's bias is ``INITIAL_KEEP_LOGIT``."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    rng = torch.Generator().manual_seed(int(seed))
    shapes = [(f"lateral{i}", c, width, 1) for i, c in enumerate(feature_channels)]
    shapes += [("image", in_channels, width, 1), ("mix", width, width, 3), ("head", width, 1, 3)]
    params: DecoderParams = {}
    for name, cin, cout, k in shapes:
        bound = 1.0 / math.sqrt(cin * k * k)
        params[f"{name}.weight"] = (torch.rand((cout, cin, k, k), generator=rng) * 2 - 1) * bound
        params[f"{name}.bias"] = (torch.rand(cout, generator=rng) * 2 - 1) * bound
    params["head.bias"] = torch.full((1,), INITIAL_KEEP_LOGIT)
    return {name: t.to(device=device, dtype=dtype) for name, t in params.items()}


def _resize(t: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(t.shape[-2:]) == size:
        return t
    if t.shape[-2] >= size[0] and t.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(t, size)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def decoder_logits(params: DecoderParams, features: Sequence[Tensor], x: Tensor) -> Tensor:
    """Mask logits ``(N, 1, H, W)`` of the images ``x`` from their features (the formula in the
    module docstring)."""
    size = decoder_resolution([tuple(f.shape[-2:]) for f in features])
    z = F.conv2d(_resize(x, size), params["image.weight"], params["image.bias"])
    for i, feature in enumerate(features):
        rms = feature.pow(2).mean((1, 2, 3), keepdim=True).add(1e-12).sqrt()
        lateral = _resize(feature / rms, size)
        z = z + F.conv2d(lateral, params[f"lateral{i}.weight"], params[f"lateral{i}.bias"])
    z = F.relu(F.conv2d(F.relu(z), params["mix.weight"], params["mix.bias"], padding=1))
    logits = F.conv2d(z, params["head.weight"], params["head.bias"], padding=1)
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
