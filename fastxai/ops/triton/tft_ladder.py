"""Triton kernels of TFT's masked batch: ``tft_ladder``, ``tft_ladder_out`` and ``tft_mask``.

Row ``n * T + t`` of the batch is :math:`w_{n,t} \\odot x_n` with the keep mask of threshold
``t``: :math:`[I \\ge \\tau_t] \\wedge [I > 0]` (value mode) or
:math:`[\\mathrm{rank}(I) \\ge \\lfloor q_t H W \\rfloor]` (percentile mode, stable rank), and
:math:`w = M` (binary) or :math:`w = M \\odot I` (soft). ``tft_ladder`` first computes
:math:`I = \\mathrm{mm}(\\mathrm{up}(\\mathrm{mm}(\\mathrm{ReLU}(\\mathrm{raw}))))` (two launches:
per-image ranges, then the map).

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

from fastxai.ops._maps_checks import check_scale_maps_inputs
from fastxai.ops._tft_checks import check_ladder_inputs, check_ladder_out
from fastxai.ops.triton._launch import divide, image_and_block, launch

MINMAX_EPS = 1e-7

# Pixels per program. The interpreter (CPU tensors) pays per program, so it gets large blocks.
_GPU_BLOCK = 1024
_INTERPRETER_BLOCK = 1 << 16


def _block(t: Tensor, size: int) -> int:
    cap = _INTERPRETER_BLOCK if t.device.type == "cpu" else _GPU_BLOCK
    return min(cap, triton.next_power_of_2(max(size, 1)))


@triton.jit
def _axis_taps(dst, in_size, out_size):
    """ATen's bilinear taps (align_corners=False) of output indices ``dst`` along one axis.

    src = max((dst + 0.5) * in / out - 0.5, 0) in float32 with one rounding, as ATen's FMA: float64
    holds the product exactly. Equal sizes and the last source index copy (weight 1 on i0).
    """
    ratio = (in_size.to(tl.float64) / out_size.to(tl.float64)).to(tl.float32)
    src = (ratio.to(tl.float64) * (dst.to(tl.float64) + 0.5) - 0.5).to(tl.float32)
    src = tl.maximum(src, 0.0)
    i0 = src.to(tl.int32)
    copy = (in_size == out_size) | (i0 >= in_size - 1)
    i0 = tl.where(in_size == out_size, dst, tl.minimum(i0, in_size - 1))
    i1 = tl.where(copy, i0, i0 + 1)
    w1 = tl.where(copy, 0.0, src - i0.to(tl.float32))
    return i0, i1, 1.0 - w1, w1


@triton.jit
def _axis_taps_f64(dst, in_size, out_size):
    """:func:`_axis_taps` in float64 (ATen's accumulation type of float64 maps)."""
    ratio = in_size.to(tl.float64) / out_size.to(tl.float64)
    src = tl.maximum(ratio * (dst.to(tl.float64) + 0.5) - 0.5, 0.0)
    i0 = src.to(tl.int32)
    copy = (in_size == out_size) | (i0 >= in_size - 1)
    i0 = tl.where(in_size == out_size, dst, tl.minimum(i0, in_size - 1))
    i1 = tl.where(copy, i0, i0 + 1)
    w1 = tl.where(copy, 0.0, src - i0.to(tl.float64))
    return i0, i1, 1.0 - w1, w1


@triton.jit
def _upsampled(raw, low_lo, low_den, pixel, valid, in_h, in_w, out_h, out_w, F64: tl.constexpr):
    """up(mm(relu(raw))) at output pixels ``pixel``: columns blended first, then rows."""
    y = pixel // out_w
    x = pixel % out_w
    if F64:
        y0, y1, wy0, wy1 = _axis_taps_f64(y, in_h, out_h)
        x0, x1, wx0, wx1 = _axis_taps_f64(x, in_w, out_w)
    else:
        y0, y1, wy0, wy1 = _axis_taps(y, in_h, out_h)
        x0, x1, wx0, wx1 = _axis_taps(x, in_w, out_w)
    r00 = tl.load(raw + y0 * in_w + x0, mask=valid, other=0.0)
    r01 = tl.load(raw + y0 * in_w + x1, mask=valid, other=0.0)
    r10 = tl.load(raw + y1 * in_w + x0, mask=valid, other=0.0)
    r11 = tl.load(raw + y1 * in_w + x1, mask=valid, other=0.0)
    v00 = divide(tl.where(r00 < 0, 0.0, r00) - low_lo, low_den, F64)
    v01 = divide(tl.where(r01 < 0, 0.0, r01) - low_lo, low_den, F64)
    v10 = divide(tl.where(r10 < 0, 0.0, r10) - low_lo, low_den, F64)
    v11 = divide(tl.where(r11 < 0, 0.0, r11) - low_lo, low_den, F64)
    top = v00 * wx0 + v01 * wx1
    bottom = v10 * wx0 + v11 * wx1
    return top * wy0 + bottom * wy1


@triton.jit(do_not_specialize=["in_h", "in_w", "out_h", "out_w"])
def _map_range_kernel(
    raw_ptr,
    range_ptr,
    in_h,
    in_w,
    out_h,
    out_w,
    EPS: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_LOW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per image: (min, min-max denominator) of relu(raw), then of its upsampled map."""
    n = tl.program_id(0).to(tl.int64)
    in_pixels = in_h * in_w
    out_pixels = out_h * out_w
    raw = raw_ptr + n * in_pixels
    dtype = raw_ptr.dtype.element_ty

    low_lo = tl.full([], float("inf"), dtype)
    low_hi = tl.full([], float("-inf"), dtype)
    nans = tl.zeros([], tl.int32)
    for start in range(0, in_pixels, BLOCK_LOW):
        offset = start + tl.arange(0, BLOCK_LOW)
        valid = offset < in_pixels
        value = tl.load(raw + offset, mask=valid, other=0.0)
        value = tl.where(value < 0, 0.0, value)
        nans += tl.sum((valid & (value != value)).to(tl.int32), axis=0)
        low_lo = tl.minimum(low_lo, tl.min(tl.where(valid, value, float("inf")), axis=0))
        low_hi = tl.maximum(low_hi, tl.max(tl.where(valid, value, float("-inf")), axis=0))
    # tl.min / tl.max skip NaN; the reference's amin / amax (and the C++ kernels) return it,
    # which makes the whole map NaN
    low_lo = tl.where(nans > 0, float("nan"), low_lo)
    low_den = (low_hi - low_lo) + EPS

    up_lo = tl.full([], float("inf"), dtype)
    up_hi = tl.full([], float("-inf"), dtype)
    for start in range(0, out_pixels, BLOCK):
        pixel = start + tl.arange(0, BLOCK)
        valid = pixel < out_pixels
        value = _upsampled(raw, low_lo, low_den, pixel, valid, in_h, in_w, out_h, out_w, F64)
        up_lo = tl.minimum(up_lo, tl.min(tl.where(valid, value, float("inf")), axis=0))
        up_hi = tl.maximum(up_hi, tl.max(tl.where(valid, value, float("-inf")), axis=0))
    tl.store(range_ptr + n * 4 + 0, low_lo)
    tl.store(range_ptr + n * 4 + 1, low_den)
    tl.store(range_ptr + n * 4 + 2, up_lo)
    tl.store(range_ptr + n * 4 + 3, (up_hi - up_lo) + EPS)


@triton.jit(do_not_specialize=["in_h", "in_w", "out_h", "out_w", "blocks"])
def _map_kernel(
    raw_ptr,
    range_ptr,
    map_ptr,
    in_h,
    in_w,
    out_h,
    out_w,
    blocks,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The map mm(up(mm(relu(raw)))) for one block of pixels of one image."""
    n, b = image_and_block(blocks)
    out_pixels = out_h * out_w
    pixel = b * BLOCK + tl.arange(0, BLOCK)
    valid = pixel < out_pixels
    low_lo = tl.load(range_ptr + n * 4 + 0)
    low_den = tl.load(range_ptr + n * 4 + 1)
    up_lo = tl.load(range_ptr + n * 4 + 2)
    up_den = tl.load(range_ptr + n * 4 + 3)
    raw = raw_ptr + n * (in_h * in_w)
    value = _upsampled(raw, low_lo, low_den, pixel, valid, in_h, in_w, out_h, out_w, F64)
    tl.store(map_ptr + n * out_pixels + pixel, divide(value - up_lo, up_den, F64), mask=valid)


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


def scale_maps(raw: Tensor, height: int, width: int) -> Tensor:
    """ReLU, min-max, bilinear upsampling and min-max of raw maps: ``(N, h, w) -> (N, H, W)``."""
    check_scale_maps_inputs(raw, height, width)
    n, in_h, in_w = raw.shape
    maps = raw.new_empty((n, height, width))
    if n == 0:
        return maps
    raw = raw.contiguous()
    ranges = raw.new_empty((n, 4))
    f64 = raw.dtype == torch.float64
    block = _block(raw, height * width)
    launch(_map_range_kernel)[(n,)](
        raw,
        ranges,
        in_h,
        in_w,
        height,
        width,
        EPS=MINMAX_EPS,
        F64=f64,
        BLOCK_LOW=_block(raw, in_h * in_w),
        BLOCK=block,
    )
    blocks = triton.cdiv(height * width, block)
    launch(_map_kernel)[(n * blocks,)](
        raw, ranges, maps, in_h, in_w, height, width, blocks, F64=f64, BLOCK=block
    )
    return maps


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
