"""Triton kernels of the per-sample mask priors and their backward.

For ``p`` of shape ``(N, C, H, W)``, per sample: area :math:`\\overline{p}`, binarisation
:math:`\\overline{p(1-p)}` and total variation: the mean :math:`|\\Delta p|` of each direction
(vertical, horizontal; with ``neighbours=8`` also both diagonals, weighted :math:`1/\\sqrt2`),
summed. Each program covers one tile of one ``(H, W)`` plane and writes six partial sums; the
sums are folded per sample in a fixed order, so results are deterministic. Backward: dL/dp per
pixel, with the subgradient sign(0) = 0 of ``|.|``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastxai.ops.triton._launch import image_and_block, launch

# (rows, columns) per tile. The interpreter (CPU tensors) pays per program: one large tile.
_GPU_TILE = (16, 64)
_INTERPRETER_TILE = (64, 128)
# Per tile (the kernels hard-code it): area, binarisation, vertical, horizontal, diagonal,
# anti-diagonal.
_PARTIAL_SUMS = 6


@triton.jit
def _neighbour(p_ptr, y, x, dy: tl.constexpr, dx: tl.constexpr, height, width, sh, sw, centre):
    """p[y + dy, x + dx], or the centre value where that, or the centre itself (the padding of a
    tile), lies outside the plane: then its difference to the centre is 0."""
    ny = y + dy
    nx = x + dx
    inside = (y < height) & (x < width) & (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
    value = tl.load(p_ptr + ny * sh + nx * sw, mask=inside, other=0.0)
    return tl.where(inside, value, centre)


@triton.jit
def _sign(d):
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))


@triton.jit
def _mask_priors_forward_kernel(
    p_ptr,
    partial_ptr,
    channels,
    height,
    width,
    tiles,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    EIGHT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    plane, tile = image_and_block(tiles)
    tiles_w = tl.cdiv(width, BLOCK_W)
    y = ((tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H))[:, None]
    x = ((tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W))[None, :]
    plane_ptr = p_ptr + (plane // channels) * stride_n + (plane % channels) * stride_c
    inside = (y < height) & (x < width)
    centre = tl.load(plane_ptr + y * stride_h + x * stride_w, mask=inside, other=0.0)
    down = _neighbour(plane_ptr, y, x, 1, 0, height, width, stride_h, stride_w, centre)
    right = _neighbour(plane_ptr, y, x, 0, 1, height, width, stride_h, stride_w, centre)

    out = partial_ptr + (plane * tiles + tile) * 6
    tl.store(out, tl.sum(tl.sum(centre, 1), 0))
    tl.store(out + 1, tl.sum(tl.sum(centre * (1 - centre), 1), 0))
    tl.store(out + 2, tl.sum(tl.sum(tl.abs(down - centre), 1), 0))
    tl.store(out + 3, tl.sum(tl.sum(tl.abs(right - centre), 1), 0))
    if EIGHT:
        down_right = _neighbour(plane_ptr, y, x, 1, 1, height, width, stride_h, stride_w, centre)
        down_left = _neighbour(plane_ptr, y, x, 1, -1, height, width, stride_h, stride_w, centre)
        tl.store(out + 4, tl.sum(tl.sum(tl.abs(down_right - centre), 1), 0))
        tl.store(out + 5, tl.sum(tl.sum(tl.abs(down_left - centre), 1), 0))
    else:
        tl.store(out + 4, 0.0)
        tl.store(out + 5, 0.0)


@triton.jit
def _mask_priors_backward_kernel(
    p_ptr,
    factors_ptr,
    grad_ptr,
    channels,
    height,
    width,
    tiles,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    EIGHT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    plane, tile = image_and_block(tiles)
    sample = plane // channels
    tiles_w = tl.cdiv(width, BLOCK_W)
    y = ((tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H))[:, None]
    x = ((tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W))[None, :]
    plane_ptr = p_ptr + sample * stride_n + (plane % channels) * stride_c
    inside = (y < height) & (x < width)
    c = tl.load(plane_ptr + y * stride_h + x * stride_w, mask=inside, other=0.0)

    factors = factors_ptr + sample * 6
    grad = tl.load(factors) + tl.load(factors + 1) * (1 - 2 * c)
    up = _neighbour(plane_ptr, y, x, -1, 0, height, width, stride_h, stride_w, c)
    down = _neighbour(plane_ptr, y, x, 1, 0, height, width, stride_h, stride_w, c)
    grad += tl.load(factors + 2) * (_sign(c - up) - _sign(down - c))
    left = _neighbour(plane_ptr, y, x, 0, -1, height, width, stride_h, stride_w, c)
    right = _neighbour(plane_ptr, y, x, 0, 1, height, width, stride_h, stride_w, c)
    grad += tl.load(factors + 3) * (_sign(c - left) - _sign(right - c))
    if EIGHT:
        up_left = _neighbour(plane_ptr, y, x, -1, -1, height, width, stride_h, stride_w, c)
        down_right = _neighbour(plane_ptr, y, x, 1, 1, height, width, stride_h, stride_w, c)
        grad += tl.load(factors + 4) * (_sign(c - up_left) - _sign(down_right - c))
        up_right = _neighbour(plane_ptr, y, x, -1, 1, height, width, stride_h, stride_w, c)
        down_left = _neighbour(plane_ptr, y, x, 1, -1, height, width, stride_h, stride_w, c)
        grad += tl.load(factors + 5) * (_sign(c - up_right) - _sign(down_left - c))
    tl.store(grad_ptr + (plane * height + y) * width + x, grad, mask=inside)


def _check_inputs(p: Tensor, neighbours: int) -> None:
    if p.dim() != 4:
        raise ValueError(f"mask_priors: p must be (N, C, H, W), got {p.dim()} dims")
    if min(p.shape[1:]) == 0:
        raise ValueError(f"mask_priors: p must have at least one pixel per sample, got {p.shape}")
    if neighbours not in (4, 8):
        raise ValueError(f"mask_priors: neighbours must be 4 or 8, got {neighbours}")


def _sum_scales(p: Tensor, neighbours: int) -> list[float]:
    """The factors turning the six per-sample sums into terms: ``1/P`` twice, then per TV
    direction its weight over its number of pairs (0 without pairs, or for 4-neighbour diagonals).
    """
    _, channels, height, width = p.shape

    def per_pair(pairs: int, weight: float = 1.0) -> float:
        return weight / pairs if pairs > 0 else 0.0

    diagonal_weight = 1 / math.sqrt(2) if neighbours == 8 else 0.0
    diagonal = per_pair(channels * (height - 1) * (width - 1), diagonal_weight)
    per_pixel = 1 / (channels * height * width)
    return [
        per_pixel,
        per_pixel,
        per_pair(channels * (height - 1) * width),
        per_pair(channels * height * (width - 1)),
        diagonal,
        diagonal,
    ]


def _tiles(p: Tensor) -> tuple[int, int, int]:
    block_h, block_w = _INTERPRETER_TILE if p.device.type == "cpu" else _GPU_TILE
    block_h = min(block_h, triton.next_power_of_2(p.shape[2]))
    block_w = min(block_w, triton.next_power_of_2(p.shape[3]))
    tiles = triton.cdiv(p.shape[2], block_h) * triton.cdiv(p.shape[3], block_w)
    return block_h, block_w, tiles


def _launch_per_tile(kernel, p: Tensor, outputs: tuple[Tensor, ...], neighbours: int) -> None:
    """``kernel(p, *outputs, channels, height, width, tiles, *strides)``, one program per tile
    of every ``(H, W)`` plane."""
    samples, channels, height, width = p.shape
    block_h, block_w, tiles = _tiles(p)
    launch(kernel)[(samples * channels * tiles,)](
        p,
        *outputs,
        channels,
        height,
        width,
        tiles,
        *p.stride(),
        EIGHT=neighbours == 8,
        BLOCK_H=block_h,
        BLOCK_W=block_w,
    )


def mask_priors(p: Tensor, neighbours: int = 4) -> Tensor:
    """Per-sample ``[area, binarisation, tv]`` ``(N, 3)`` of masks ``p`` ``(N, C, H, W)``."""
    _check_inputs(p, neighbours)
    samples, channels = p.shape[:2]
    if samples == 0:
        return p.new_empty((0, 3))
    tiles = _tiles(p)[2]
    partial = p.new_empty((samples * channels, tiles, _PARTIAL_SUMS))
    _launch_per_tile(_mask_priors_forward_kernel, p, (partial,), neighbours)
    sums = partial.view(samples, channels * tiles, _PARTIAL_SUMS).sum(1)
    # Python-float scales: no host-to-device copy per call (CUDA graphs can capture it).
    scales = _sum_scales(p, neighbours)
    weighted = [sums[:, i] * scale for i, scale in enumerate(scales)]
    tv = weighted[2] + weighted[3] + weighted[4] + weighted[5]
    return torch.stack([weighted[0], weighted[1], tv], 1)


def mask_priors_backward(grad_terms: Tensor, p: Tensor, neighbours: int) -> Tensor:
    """dL/dp of :func:`mask_priors` from ``grad_terms`` ``(N, 3)``."""
    _check_inputs(p, neighbours)
    grad_p = p.new_empty(p.shape)
    if p.shape[0] == 0:
        return grad_p
    # Per sample: [area, binarisation, vertical, horizontal, diagonal, anti-diagonal] factors.
    scales = _sum_scales(p, neighbours)
    upstream = [grad_terms[:, term] for term in (0, 1, 2, 2, 2, 2)]
    factors = torch.stack([g * scale for g, scale in zip(upstream, scales, strict=True)], 1)
    _launch_per_tile(_mask_priors_backward_kernel, p, (factors, grad_p), neighbours)
    return grad_p
