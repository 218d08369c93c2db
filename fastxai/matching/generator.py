"""The paper recipe's mask generator (the authors' notebook): a U-Net per image, many images
trained in one launch.

Each image has its own generator. Their weights are stacked along a leading group axis ``G``. On
an accelerator every convolution runs as one grouped convolution (``groups=G``) over the images
laid side by side in the channel axis, so ``G`` generators cost one kernel launch per layer. On the
CPU each generator runs on its own, one U-Net after the other: a launch costs nothing there beside
a 224x224 convolution, and oneDNN returns grouped outputs channels-last, which the compiled step
then spends more time transposing than the grouped call saved (batch 4 ran 1.25x slower per image
than batch 1). (``torch.func.vmap`` would fall back to a loop over the custom ``mask_priors``
op.)

Architecture (width ``w``, depth ``d``; the notebook's ``UNetCSAE`` is ``w = 32, d = 4``):
encoder ``d`` DoubleConv stages ``3 -> w -> 2w -> ... -> 2^{d-1} w``, each followed by a 2x2 max
pool; a DoubleConv bottleneck to ``2^d w``; ``d`` decoder stages of ConvTranspose2d(k=2, s=2)
halving the channels, concatenation with the skip and a DoubleConv; a final 1x1 convolution to one
channel of mask logits at input resolution. DoubleConv = (conv 3x3, pad 1, ReLU) twice. No
normalisation, no dropout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# name -> stacked parameter (G, ...); ordered as created, so initialisation is reproducible.
GeneratorParams = dict[str, Tensor]


def _conv_shapes(in_channels: int, width: int, depth: int) -> list[tuple[str, str, int, int, int]]:
    """(name, kind, in, out, kernel) of every layer, in forward order."""
    layers: list[tuple[str, str, int, int, int]] = []
    channels = in_channels
    for level in range(depth):
        out = width * 2**level
        layers += [
            (f"enc{level}.a", "conv", channels, out, 3),
            (f"enc{level}.b", "conv", out, out, 3),
        ]
        channels = out
    bottom = width * 2**depth
    layers += [("mid.a", "conv", channels, bottom, 3), ("mid.b", "conv", bottom, bottom, 3)]
    channels = bottom
    for level in reversed(range(depth)):
        out = width * 2**level
        layers += [
            (f"up{level}", "transpose", channels, out, 2),
            (f"dec{level}.a", "conv", 2 * out, out, 3),
            (f"dec{level}.b", "conv", out, out, 3),
        ]
        channels = out
    layers.append(("head", "conv", channels, 1, 1))
    return layers


def init_generator_params(
    seeds: list[int],
    *,
    in_channels: int = 3,
    width: int = 32,
    depth: int = 4,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> GeneratorParams:
    """Stacked weights of ``len(seeds)`` U-Nets, generator ``g`` initialised from ``seeds[g]``.

    Every weight and bias is drawn from :math:`U(-1/\\sqrt{\\mathrm{fan\\_in}}, 1/\\sqrt{
    \\mathrm{fan\\_in}})`, PyTorch's default for ``nn.Conv2d`` and ``nn.ConvTranspose2d`` (whose
    fan-in is ``out * k * k``). Drawing per seed makes generator ``g`` identical whether it is
    trained alone or beside others.
    """
    if width < 1 or depth < 0:
        raise ValueError(f"width must be >= 1 and depth >= 0, got width={width}, depth={depth}")
    per_seed: list[dict[str, Tensor]] = []
    for seed in seeds:
        rng = torch.Generator().manual_seed(int(seed))
        params: dict[str, Tensor] = {}
        for name, kind, cin, cout, k in _conv_shapes(in_channels, width, depth):
            shape = (cin, cout, k, k) if kind == "transpose" else (cout, cin, k, k)
            bound = 1.0 / math.sqrt(shape[1] * k * k)
            weight = torch.rand(shape, generator=rng, dtype=torch.float64) * 2 - 1
            bias = torch.rand(cout, generator=rng, dtype=torch.float64) * 2 - 1
            params[f"{name}.weight"] = weight * bound
            params[f"{name}.bias"] = bias * bound
        per_seed.append(params)
    return {
        name: torch.stack([p[name] for p in per_seed]).to(device=device, dtype=dtype)
        for name in per_seed[0]
    }


def generator_depth(params: GeneratorParams) -> int:
    """The depth ``d`` of stacked generator weights."""
    return sum(1 for name in params if name.startswith("enc") and name.endswith(".a.weight"))


def _conv(x: Tensor, params: GeneratorParams, name: str, relu: bool = True) -> Tensor:
    """Grouped 2-D convolution of ``x`` ``(G, C, H, W)`` with generator ``g``'s weights on
    image ``g``; 'same' padding."""
    weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
    groups, cout, cin, k, _ = weight.shape
    height, width = x.shape[-2:]
    if groups == 1:  # one generator for every image of x
        y = F.conv2d(x, weight[0], bias[0], padding=k // 2)
        return F.relu(y) if relu else y
    y = F.conv2d(
        x.reshape(1, groups * cin, height, width),
        weight.reshape(groups * cout, cin, k, k),
        bias.reshape(groups * cout),
        padding=k // 2,
        groups=groups,
    ).view(groups, cout, height, width)
    return F.relu(y) if relu else y


def _up(x: Tensor, params: GeneratorParams, name: str) -> Tensor:
    """Grouped ConvTranspose2d(k=2, s=2): doubles the resolution."""
    weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
    groups, cin, cout, k, _ = weight.shape
    height, width = x.shape[-2:]
    if groups == 1:
        return F.conv_transpose2d(x, weight[0], bias[0], stride=2)
    y = F.conv_transpose2d(
        x.reshape(1, groups * cin, height, width),
        weight.reshape(groups * cin, cout, k, k),
        bias.reshape(groups * cout),
        stride=2,
        groups=groups,
    )
    return y.view(groups, cout, 2 * height, 2 * width)


def generator_logits(params: GeneratorParams, x: Tensor, *, grouped: bool | None = None) -> Tensor:
    """Mask logits ``(N, 1, H, W)``: of image ``x[g]`` under generator ``g`` (``N = G``), or of
    every image under the one generator (``G = 1``). Sizes not divisible by ``2^depth`` are
    padded (replicated border) for the U-Net and the logits cropped back. ``grouped``: one
    grouped convolution per layer for all ``G`` generators, or each generator on its own;
    default grouped except on the CPU (see the module docstring)."""
    groups = next(iter(params.values())).shape[0]
    if grouped is None:
        grouped = x.device.type != "cpu"
    if groups > 1 and not grouped:
        # split, not indexing: its backward is one cat per weight, not G zero-filled copies
        per_generator = zip(*(t.split(1) for t in params.values()), strict=True)
        return torch.cat(
            [
                _unet_logits(dict(zip(params, weights, strict=True)), image)
                for weights, image in zip(per_generator, x.split(1), strict=True)
            ]
        )
    return _unet_logits(params, x)


def _unet_logits(params: GeneratorParams, x: Tensor) -> Tensor:
    depth = generator_depth(params)
    height, width = x.shape[-2:]
    multiple = 2**depth
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:  # any input size: replicate the border up to a multiple, crop the logits
        padded = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return _unet_logits(params, padded)[..., :height, :width]
    skips: list[Tensor] = []
    h = x
    for level in range(depth):
        h = _conv(_conv(h, params, f"enc{level}.a"), params, f"enc{level}.b")
        skips.append(h)
        h = F.max_pool2d(h, 2)
    h = _conv(_conv(h, params, "mid.a"), params, "mid.b")
    for level in reversed(range(depth)):
        h = torch.cat([_up(h, params, f"up{level}"), skips[level]], 1)
        h = _conv(_conv(h, params, f"dec{level}.a"), params, f"dec{level}.b")
    return _conv(h, params, "head", relu=False)


def straight_through_mask(p: Tensor) -> Tensor:
    """:math:`m = p + (1[p > 0.5] - p)` with the bracket detached: forward the hard mask,
    backward the identity to ``p`` (the straight-through estimator)."""
    return p + ((p > 0.5).to(p.dtype) - p).detach()
