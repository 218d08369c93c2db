"""Triton kernels of TFT's masked batch: ``tft_ladder``, ``tft_ladder_out`` and ``tft_mask``.

Row ``n * T + t`` of the batch is :math:`w_{n,t} \\odot x_n` with the keep mask of threshold
``t``: :math:`[I \\ge \\tau_t] \\wedge [I > 0]` (value mode) or
:math:`[\\mathrm{rank}(I) \\ge \\lfloor q_t H W \\rfloor]` (percentile mode, stable rank), and
:math:`w = M` (binary) or :math:`w = M \\odot I` (soft). ``tft_ladder`` first computes
:math:`I = \\mathrm{mm}(\\mathrm{up}(\\mathrm{mm}(\\mathrm{ReLU}(\\mathrm{raw}))))` with the
``scale_maps`` kernels (:mod:`fastxai.ops.triton.fuse_maps`).

Percentile mode sorts each map with ``torch.sort(stable=True)`` between the map and the mask
launches and passes the kernel, per (image, threshold), the pivot: the (value, index) key of the
pixel of rank :math:`\\lfloor q H W \\rfloor`. A pixel is kept when its key does not sort before
the pivot's (``csrc/include/fastxai/tft_ladder.h``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastxai.ops._tft_checks import check_ladder_inputs, check_ladder_out
from fastxai.ops.triton._launch import image_and_block, launch
from fastxai.ops.triton.fuse_maps import _block, scale_maps


@triton.jit(do_not_specialize=["thresholds", "channels", "pixels", "blocks"])
def _mask_kernel(
    map_ptr,
    image_ptr,
    out_ptr,
    tau_ptr,
    pivot_value_ptr,
    pivot_index_ptr,
    thresholds,
    channels,
    pixels,
    blocks,
    PERCENTILE: tl.constexpr,
    SOFT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """T * C output rows of one block of pixels of one image: weight_t * image_c."""
    n, b = image_and_block(blocks)
    pixel = b * BLOCK + tl.arange(0, BLOCK)
    valid = pixel < pixels
    value = tl.load(map_ptr + n * pixels + pixel, mask=valid, other=0.0)
    for t in range(0, thresholds):
        if PERCENTILE:
            pivot_value = tl.load(pivot_value_ptr + n * thresholds + t)
            pivot_index = tl.load(pivot_index_ptr + n * thresholds + t)
            earlier = pixel < pivot_index
            # sorts_before of tft_ladder.h: comparisons with NaN are false.
            before = (value < pivot_value) | ((value == pivot_value) & earlier)
            after_nan = tl.where(pivot_value != pivot_value, (value == value) | earlier, False)
            keep = (before | after_nan) == 0
        else:
            tau = tl.load(tau_ptr + t)
            keep = (value >= tau) & (value > 0)
        weight = keep.to(value.dtype)
        if SOFT:
            weight = weight * value
        row = (n * thresholds + t) * channels
        for c in range(0, channels):
            image = tl.load(image_ptr + (n * channels + c) * pixels + pixel, mask=valid, other=0.0)
            tl.store(out_ptr + (row + c) * pixels + pixel, weight * image, mask=valid)


def percentile_pivots(maps: Tensor, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """Per (image, threshold): the (value, index) key of the pixel of stable rank
    ``floor(q * H * W)``, or ``(NaN, H * W)`` when every pixel is muted. ``(N, HW)`` maps."""
    pixels = maps.shape[1]
    # a NaN threshold mutes nothing, as in the reference and the C++ kernels
    muted = torch.floor(thresholds.double() * pixels).nan_to_num(0.0).clamp(0, pixels).long()
    values, order = torch.sort(maps, dim=1, stable=True)
    rank = muted.clamp(max=pixels - 1)
    everything = (muted == pixels)[None, :]
    pivot_values = values[:, rank].masked_fill(everything, float("nan"))
    pivot_indices = order[:, rank].masked_fill(everything, pixels)
    return pivot_values.contiguous(), pivot_indices.contiguous()


def _write_masked_batch(
    maps: Tensor, images: Tensor, thresholds: Tensor, mode: str, mask: str, out: Tensor
) -> None:
    n, channels, height, width = images.shape
    pixels = height * width
    if out.numel() == 0:
        return
    maps = maps.contiguous()
    images = images.contiguous()
    percentile = mode == "percentile"
    if percentile:
        pivot_values, pivot_indices = percentile_pivots(maps.view(n, pixels), thresholds)
        taus = pivot_values
    else:
        taus = thresholds.to(maps.dtype).contiguous()
        pivot_values, pivot_indices = taus, taus.new_zeros(1, dtype=torch.int64)
    block = _block(images, pixels)
    blocks = triton.cdiv(pixels, block)
    launch(_mask_kernel)[(n * blocks,)](
        maps,
        images,
        out,
        taus,
        pivot_values,
        pivot_indices,
        thresholds.shape[0],
        channels,
        pixels,
        blocks,
        PERCENTILE=percentile,
        SOFT=mask == "soft",
        BLOCK=block,
    )


def _new_batch(images: Tensor, thresholds: Tensor) -> Tensor:
    n, channels, height, width = images.shape
    return images.new_empty((n * thresholds.shape[0], channels, height, width))


def _ladder_into(
    op: str,
    raw: Tensor,
    images: Tensor,
    thresholds: Tensor,
    threshold_mode: str,
    mask_kind: str,
    out: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The masked batch of the raw CAM's map, written into ``out`` (a new one when ``None``),
    and the map."""
    check_ladder_inputs(
        op, raw, images, thresholds, threshold_mode, mask_kind, at_input_resolution=False
    )
    if out is None:
        out = _new_batch(images, thresholds)
    else:
        check_ladder_out(op, out, images, thresholds)
    maps = scale_maps(raw, images.shape[2], images.shape[3])
    _write_masked_batch(maps, images, thresholds, threshold_mode, mask_kind, out)
    return out, maps


def tft_mask(
    maps: Tensor, images: Tensor, thresholds: Tensor, threshold_mode: str, mask_kind: str
) -> Tensor:
    """The masked batch ``(N * T, C, H, W)`` from input-resolution maps ``(N, H, W)``."""
    check_ladder_inputs(
        "tft_mask",
        maps,
        images,
        thresholds,
        threshold_mode,
        mask_kind,
        at_input_resolution=True,
    )
    out = _new_batch(images, thresholds)
    _write_masked_batch(maps, images, thresholds, threshold_mode, mask_kind, out)
    return out


def tft_ladder(
    raw: Tensor, images: Tensor, thresholds: Tensor, threshold_mode: str, mask_kind: str
) -> tuple[Tensor, Tensor]:
    """The masked batch ``(N * T, C, H, W)`` and the map ``(N, H, W)`` from a raw CAM."""
    return _ladder_into("tft_ladder", raw, images, thresholds, threshold_mode, mask_kind, None)


def tft_ladder_out(
    raw: Tensor,
    images: Tensor,
    thresholds: Tensor,
    threshold_mode: str,
    mask_kind: str,
    out: Tensor,
) -> Tensor:
    """:func:`tft_ladder` writing the batch into ``out``; returns the map."""
    args = (raw, images, thresholds, threshold_mode, mask_kind, out)
    return _ladder_into("tft_ladder_out", *args)[1]
