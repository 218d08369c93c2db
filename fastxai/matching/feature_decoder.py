"""The amortised mode's mask decoder: cell logits from the classifier's own features and a
class-evidence map.

One decoder shared by every image has to tell *from the image* which cells the classifier relies
on for class :math:`c`. The matched layers' activations :math:`\\varphi_\\ell(x)` already say
where the evidence is (the encoder of real-time saliency is likewise the classifier's backbone),
and the class enters as Grad-CAM's map of :math:`c` at the deepest matched layer, :math:`G_c`
(real-time saliency learns a class embedding instead: with a handful of photos and a thousand
classes that cannot be learnt, while :math:`G_c` is defined for every class without training).

Everything is computed on the stable recipe's cell grid (16-pixel cells at 224:
:func:`fastxai.matching.ladder.fine_cell`), ``g_h x g_w``:

.. math::
    z = \\mathrm{ReLU}\\Big(\\sum_\\ell W_\\ell\\, \\mathrm{grid}\\big(\\varphi_\\ell(x) /
    \\mathrm{rms}(\\varphi_\\ell(x))\\big) + W_x\\, \\mathrm{grid}(x) + W_G\\, \\mathrm{grid}(G_c)
    \\Big), \\quad \\mathrm{logits} = K_2 * \\mathrm{ReLU}(K_1 * z) + b

with ``W`` 1x1 convolutions to ``width`` channels, ``K_1`` a 3x3 convolution ``width -> width``,
``K_2`` a 3x3 convolution to one channel, ``rms`` per image over the layer, ``grid`` area pooling
when larger than the grid and bilinear when smaller. Training smooths the cell mask by bilinear
upsampling; explanations rank the cells by their logits (:mod:`fastxai.matching.amortised`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DecoderParams = dict[str, Tensor]


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
    ``nn.Conv2d``), drawn from ``seed``."""
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"width: expected an int >= 1, got {width!r}")
    rng = torch.Generator().manual_seed(int(seed))
    shapes = [(f"lateral{i}", c, width, 1) for i, c in enumerate(feature_channels)]
    shapes += [
        ("image", in_channels, width, 1),
        ("evidence", 1, width, 1),
        ("mix", width, width, 3),
        ("head", width, 1, 3),
    ]
    params: DecoderParams = {}
    for name, cin, cout, k in shapes:
        bound = 1.0 / math.sqrt(cin * k * k)
        params[f"{name}.weight"] = (torch.rand((cout, cin, k, k), generator=rng) * 2 - 1) * bound
        params[f"{name}.bias"] = (torch.rand(cout, generator=rng) * 2 - 1) * bound
    return {name: t.to(device=device, dtype=dtype) for name, t in params.items()}


def to_grid(t: Tensor, grid: tuple[int, int]) -> Tensor:
    """``t`` ``(N, C, h, w)`` on the ``grid``: area pooling when larger, bilinear when smaller."""
    if tuple(t.shape[-2:]) == grid:
        return t
    if t.shape[-2] >= grid[0] and t.shape[-1] >= grid[1]:
        return F.adaptive_avg_pool2d(t, grid)
    return F.interpolate(t, size=grid, mode="bilinear", align_corners=False)


def decoder_inputs(
    features: Sequence[Tensor], x: Tensor, evidence: Tensor, grid: tuple[int, int]
) -> list[Tensor]:
    """The decoder's inputs on the grid: each layer RMS-normalised, then ``x``, then the
    evidence map ``(N, h, w)``."""
    inputs = []
    for feature in features:
        rms = feature.pow(2).mean((1, 2, 3), keepdim=True).add(1e-12).sqrt()
        inputs.append(to_grid(feature / rms, grid))
    inputs.append(to_grid(x, grid))
    inputs.append(to_grid(evidence[:, None].to(x.dtype), grid))
    return inputs


def decoder_logits(params: DecoderParams, inputs: Sequence[Tensor]) -> Tensor:
    """Cell logits ``(N, 1, g_h, g_w)`` from :func:`decoder_inputs`."""
    *features, image, evidence = inputs
    z = F.conv2d(image, params["image.weight"], params["image.bias"])
    z = z + F.conv2d(evidence, params["evidence.weight"], params["evidence.bias"])
    for i, feature in enumerate(features):
        z = z + F.conv2d(feature, params[f"lateral{i}.weight"], params[f"lateral{i}.bias"])
    z = F.relu(F.conv2d(F.relu(z), params["mix.weight"], params["mix.bias"], padding=1))
    return F.conv2d(z, params["head.weight"], params["head.bias"], padding=1)
