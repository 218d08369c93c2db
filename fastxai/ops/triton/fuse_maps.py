"""Triton kernels of ``fuse_maps`` (several layers' raw maps upsampled and fused, ``(N, H, W)``)
and of ``scale_maps``, its one-layer case.

``"mean"``: :math:`\\mathrm{mm}(\\tfrac1L \\sum_l \\mathrm{relu}(\\mathrm{up}(\\mathrm{mm}(
\\mathrm{relu}(r_l)))))`; ``"tanh"``: :math:`\\mathrm{mm}(\\max_l \\tanh(2 M_l / \\max(\\max M_l,
10^{-7})))`, :math:`M_l = \\mathrm{mm}(\\mathrm{up}(\\mathrm{mm}(\\mathrm{relu}(r_l))))`.

Per layer two launches: the (image, layer) ranges, then per block of output pixels the layer's
samples folded into the output (the last layer also writes each block's (min, max)). Then per
image its range from its blocks' ranges, and per block the final min-max. ``scale_maps`` is the
``"mean"`` fusion of one layer: every pass but the small low-resolution range spreads one
image over many programs. No launch takes host data that would need a copy to the device (CUDA
graphs can capture the ops). Reductions carry an explicit NaN flag: Triton's min/max need not
propagate NaN, and the reference turns a whole map NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastxai.ops._maps_checks import check_fuse_maps_inputs, check_scale_maps_inputs
from fastxai.ops.triton._launch import divide, exp, image_and_block, launch, precise_exp

MINMAX_EPS = 1e-7

# Pixels per program. The interpreter (CPU tensors) pays per program, so it gets large blocks.
_GPU_BLOCK = 1024
_INTERPRETER_BLOCK = 1 << 16


def _block(t: Tensor, size: int) -> int:
    cap = _INTERPRETER_BLOCK if t.device.type == "cpu" else _GPU_BLOCK
    return min(cap, triton.next_power_of_2(max(size, 1)))


@triton.jit
def _axis_taps(dst, in_size, out_size, F64: tl.constexpr):
    """ATen's bilinear taps (align_corners=False) of output indices ``dst`` along one axis.

    src = max((dst + 0.5) * in / out - 0.5, 0), in float64 for float64 maps (ATen's accumulation
    type) and for float32 maps in float32 with one rounding, as ATen's FMA (float64 holds the
    product exactly). Equal sizes and the last source index copy (weight 1 on i0).
    """
    if F64:
        ratio = in_size.to(tl.float64) / out_size.to(tl.float64)
        src = tl.maximum(ratio * (dst.to(tl.float64) + 0.5) - 0.5, 0.0)
    else:
        ratio = (in_size.to(tl.float64) / out_size.to(tl.float64)).to(tl.float32)
        src = (ratio.to(tl.float64) * (dst.to(tl.float64) + 0.5) - 0.5).to(tl.float32)
        src = tl.maximum(src, 0.0)
    i0 = src.to(tl.int32)
    copy = (in_size == out_size) | (i0 >= in_size - 1)
    i0 = tl.where(in_size == out_size, dst, tl.minimum(i0, in_size - 1))
    i1 = tl.where(copy, i0, i0 + 1)
    w1 = tl.where(copy, 0.0, src - i0.to(src.dtype))
    return i0, i1, 1.0 - w1, w1


@triton.jit
def _upsampled(raw, low_lo, low_den, pixel, valid, in_h, in_w, out_h, out_w, F64: tl.constexpr):
    """up(mm(relu(raw))) at output pixels ``pixel``: columns blended first, then rows."""
    y = pixel // out_w
    x = pixel % out_w
    y0, y1, wy0, wy1 = _axis_taps(y, in_h, out_h, F64)
    x0, x1, wx0, wx1 = _axis_taps(x, in_w, out_w, F64)
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


_RANGE_FIELDS = 5  # low_lo, low_den, up_lo, up_den, peak


@triton.jit
def _nan_min(a, b):
    return tl.where((b < a) | (b != b), b, a)


@triton.jit
def _nan_max(a, b):
    return tl.where((b > a) | (b != b), b, a)


@triton.jit
def _min_max(value, valid):
    """(min, max) of ``value`` where ``valid``; both NaN when a valid value is NaN."""
    bad = tl.max(tl.where(valid & (value != value), 1, 0), axis=0) > 0
    lo = tl.min(tl.where(valid, value, float("inf")), axis=0)
    hi = tl.max(tl.where(valid, value, float("-inf")), axis=0)
    return tl.where(bad, float("nan"), lo), tl.where(bad, float("nan"), hi)


@triton.jit
def _tanh(x, F64: tl.constexpr, PRECISE: tl.constexpr):
    """tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) (libdevice's on a GPU): no
    overflow; absolute error a few ulps of 1."""
    e = exp(-2.0 * tl.abs(x), PRECISE)
    t = divide(1.0 - e, 1.0 + e, F64)
    return tl.where(x < 0, -t, t)


@triton.jit(do_not_specialize=["in_h", "in_w", "out_h", "out_w"])
def _layer_range_kernel(
    raw_ptr,
    range_ptr,
    in_h,
    in_w,
    out_h,
    out_w,
    EPS: tl.constexpr,
    UP_RANGE: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_LOW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One image of one layer: range of relu(raw); with UP_RANGE also of up(mm(relu(raw))) and
    tanh's divisor max(mm(max up), 1e-7)."""
    n = tl.program_id(0).to(tl.int64)
    in_pixels = in_h * in_w
    raw = raw_ptr + n * in_pixels
    dtype = raw_ptr.dtype.element_ty

    low_lo = tl.full([], float("inf"), dtype)
    low_hi = tl.full([], float("-inf"), dtype)
    for start in range(0, in_pixels, BLOCK_LOW):
        offset = start + tl.arange(0, BLOCK_LOW)
        valid = offset < in_pixels
        value = tl.load(raw + offset, mask=valid, other=0.0)
        lo, hi = _min_max(tl.where(value < 0, 0.0, value), valid)
        low_lo = _nan_min(low_lo, lo)
        low_hi = _nan_max(low_hi, hi)
    low_den = (low_hi - low_lo) + EPS
    tl.store(range_ptr + n * 5 + 0, low_lo)
    tl.store(range_ptr + n * 5 + 1, low_den)

    if UP_RANGE:
        up_lo = tl.full([], float("inf"), dtype)
        up_hi = tl.full([], float("-inf"), dtype)
        for start in range(0, out_h * out_w, BLOCK):
            pixel = start + tl.arange(0, BLOCK)
            valid = pixel < out_h * out_w
            value = _upsampled(raw, low_lo, low_den, pixel, valid, in_h, in_w, out_h, out_w, F64)
            lo, hi = _min_max(value, valid)
            up_lo = _nan_min(up_lo, lo)
            up_hi = _nan_max(up_hi, hi)
        up_den = (up_hi - up_lo) + EPS
        peak = divide(up_hi - up_lo, up_den, F64)
        tl.store(range_ptr + n * 5 + 2, up_lo)
        tl.store(range_ptr + n * 5 + 3, up_den)
        tl.store(range_ptr + n * 5 + 4, tl.where(peak < EPS, EPS, peak))


@triton.jit(do_not_specialize=["in_h", "in_w", "out_h", "out_w", "layers", "blocks"])
def _fuse_layer_kernel(
    raw_ptr,
    range_ptr,
    out_ptr,
    partial_ptr,
    in_h,
    in_w,
    out_h,
    out_w,
    layers,
    blocks,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    TANH: tl.constexpr,
    F64: tl.constexpr,
    PRECISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One layer's samples at one block of pixels of one image folded into the fused value
    (sum or max, in ``out``); the last layer finishes the value (the mean's division) and writes
    the block's (min, max)."""
    n, b = image_and_block(blocks)
    out_pixels = out_h * out_w
    pixel = b * BLOCK + tl.arange(0, BLOCK)
    valid = pixel < out_pixels
    dtype = out_ptr.dtype.element_ty
    ranges = range_ptr + n * 5
    raw = raw_ptr + n * (in_h * in_w)
    up = _upsampled(
        raw, tl.load(ranges + 0), tl.load(ranges + 1), pixel, valid, in_h, in_w, out_h, out_w, F64
    )
    if TANH:
        scaled = divide(up - tl.load(ranges + 2), tl.load(ranges + 3), F64)
        value = _tanh(divide(2.0 * scaled, tl.load(ranges + 4), F64), F64, PRECISE)
    else:
        value = tl.where(up < 0, 0.0, up)
    out = out_ptr + n * out_pixels + pixel
    if FIRST:
        acc = value
    else:
        previous = tl.load(out, mask=valid, other=0.0)
        acc = _nan_max(previous, value) if TANH else previous + value
    if LAST:
        if not TANH:
            acc = divide(acc, tl.zeros([BLOCK], dtype) + layers.to(dtype), F64)
        lo, hi = _min_max(acc, valid)
        tl.store(partial_ptr + (n * blocks + b) * 2 + 0, lo)
        tl.store(partial_ptr + (n * blocks + b) * 2 + 1, hi)
    tl.store(out, acc, mask=valid)


@triton.jit(do_not_specialize=["blocks"])
def _image_range_kernel(partial_ptr, image_range_ptr, blocks, BLOCK: tl.constexpr):
    """One image's (min, max) from its blocks' (min, max)."""
    n = tl.program_id(0).to(tl.int64)
    dtype = partial_ptr.dtype.element_ty
    lo = tl.full([], float("inf"), dtype)
    hi = tl.full([], float("-inf"), dtype)
    for start in range(0, blocks, BLOCK):
        k = start + tl.arange(0, BLOCK)
        live = k < blocks
        block_lo, _ = _min_max(tl.load(partial_ptr + (n * blocks + k) * 2 + 0, mask=live), live)
        _, block_hi = _min_max(tl.load(partial_ptr + (n * blocks + k) * 2 + 1, mask=live), live)
        lo = _nan_min(lo, block_lo)
        hi = _nan_max(hi, block_hi)
    tl.store(image_range_ptr + n * 2 + 0, lo)
    tl.store(image_range_ptr + n * 2 + 1, hi)


@triton.jit(do_not_specialize=["out_pixels", "blocks"])
def _rescale_kernel(
    out_ptr,
    image_range_ptr,
    out_pixels,
    blocks,
    EPS: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """min-max of one block of pixels of one image, with the image's range."""
    n, b = image_and_block(blocks)
    lo = tl.load(image_range_ptr + n * 2 + 0)
    hi = tl.load(image_range_ptr + n * 2 + 1)
    pixel = b * BLOCK + tl.arange(0, BLOCK)
    valid = pixel < out_pixels
    value = tl.load(out_ptr + n * out_pixels + pixel, mask=valid, other=0.0)
    scaled = divide(value - lo, (hi - lo) + EPS, F64)
    tl.store(out_ptr + n * out_pixels + pixel, scaled, mask=valid)


def _fused(raws: list[Tensor], height: int, width: int, tanh: bool) -> Tensor:
    first = raws[0]
    n = first.shape[0]
    out = first.new_empty((n, height, width))
    if n == 0:
        return out
    f64 = first.dtype == torch.float64
    pixels = height * width
    block = _block(first, pixels)
    blocks = triton.cdiv(pixels, block)
    partials = first.new_empty((n, blocks, 2))
    ranges = first.new_empty((n, _RANGE_FIELDS))
    for index, raw in enumerate(raws):
        raw = raw.contiguous()
        in_h, in_w = raw.shape[1], raw.shape[2]
        launch(_layer_range_kernel)[(n,)](
            raw,
            ranges,
            in_h,
            in_w,
            height,
            width,
            EPS=MINMAX_EPS,
            UP_RANGE=tanh,
            F64=f64,
            BLOCK_LOW=_block(first, in_h * in_w),
            BLOCK=block,
        )
        launch(_fuse_layer_kernel)[(n * blocks,)](
            raw,
            ranges,
            out,
            partials,
            in_h,
            in_w,
            height,
            width,
            len(raws),
            blocks,
            FIRST=index == 0,
            LAST=index == len(raws) - 1,
            TANH=tanh,
            F64=f64,
            PRECISE=precise_exp(first),
            BLOCK=block,
        )
    image_ranges = first.new_empty((n, 2))
    launch(_image_range_kernel)[(n,)](
        partials, image_ranges, blocks, BLOCK=min(1024, triton.next_power_of_2(blocks))
    )
    launch(_rescale_kernel)[(n * blocks,)](
        out, image_ranges, pixels, blocks, EPS=MINMAX_EPS, F64=f64, BLOCK=block
    )
    return out


def _check_dtype(op: str, t: Tensor) -> None:
    torch._check(
        t.dtype in (torch.float32, torch.float64),
        lambda: f"{op}: Triton takes float32 or float64 maps, got {t.dtype}",
    )


def fuse_maps(raws: list[Tensor], height: int, width: int, fusion: str) -> Tensor:
    """``(N, h_l, w_l)`` maps of L layers -> ``(N, height, width)``."""
    check_fuse_maps_inputs(raws, height, width, fusion)
    _check_dtype("fuse_maps", raws[0])
    return _fused(raws, height, width, tanh=fusion == "tanh")


def scale_maps(raw: Tensor, height: int, width: int) -> Tensor:
    """mm(up(mm(relu(raw)))): ``(N, h, w) -> (N, height, width)``, the mean fusion of one layer
    (the upsampled map is non-negative, so its ReLU is the identity, and the mean divides by 1)."""
    check_scale_maps_inputs(raw, height, width)
    _check_dtype("scale_maps", raw)
    return _fused([raw], height, width, tanh=False)
