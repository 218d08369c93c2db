"""Triton kernels of ``fuse_maps``: several layers' raw maps upsampled and fused, ``(N, H, W)``.

``"mean"``: :math:`\\mathrm{mm}(\\tfrac1L \\sum_l \\mathrm{relu}(\\mathrm{up}(\\mathrm{mm}(
\\mathrm{relu}(r_l)))))`; ``"tanh"``: :math:`\\mathrm{mm}(\\max_l \\tanh(2 M_l / \\max(\\max M_l,
10^{-7})))`, :math:`M_l = \\mathrm{mm}(\\mathrm{up}(\\mathrm{mm}(\\mathrm{relu}(r_l))))`.

Three launches: per (image, layer) ranges (one launch per layer); per block of output pixels the
fused value of every layer's samples, with the block's (min, max); per block the final min-max,
from the image's block ranges. The layers' maps are packed into one flat buffer (they are small)
so one program can loop over them. Reductions carry an explicit NaN flag: Triton's min/max need
not propagate NaN, and the reference turns a whole map NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastxai.ops._fuse_maps_checks import check_fuse_maps_inputs, fuse_maps_fake
from fastxai.ops.triton._launch import exp, image_and_block, on_device_of, precise_exp
from fastxai.ops.triton.tft_ladder import MINMAX_EPS, _block, _divide, _upsampled

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
    t = _divide(1.0 - e, 1.0 + e, F64)
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
        peak = _divide(up_hi - up_lo, up_den, F64)
        tl.store(range_ptr + n * 5 + 2, up_lo)
        tl.store(range_ptr + n * 5 + 3, up_den)
        tl.store(range_ptr + n * 5 + 4, tl.where(peak < EPS, EPS, peak))


@triton.jit(do_not_specialize=["num_maps", "out_h", "out_w", "layers", "blocks"])
def _fuse_kernel(
    flat_ptr,
    offset_ptr,
    size_ptr,
    range_ptr,
    out_ptr,
    partial_ptr,
    num_maps,
    out_h,
    out_w,
    layers,
    blocks,
    TANH: tl.constexpr,
    F64: tl.constexpr,
    PRECISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The fused value before the final min-max at one block of pixels of one image, and the
    block's (min, max)."""
    n, b = image_and_block(blocks)
    out_pixels = out_h * out_w
    pixel = b * BLOCK + tl.arange(0, BLOCK)
    valid = pixel < out_pixels
    dtype = out_ptr.dtype.element_ty
    acc = tl.full([BLOCK], float("-inf") if TANH else 0.0, dtype)
    for layer in range(0, layers):
        in_h = tl.load(size_ptr + 2 * layer)
        in_w = tl.load(size_ptr + 2 * layer + 1)
        raw = flat_ptr + tl.load(offset_ptr + layer) + n * (in_h * in_w)
        ranges = range_ptr + (layer * num_maps + n) * 5
        low_lo = tl.load(ranges + 0)
        low_den = tl.load(ranges + 1)
        up = _upsampled(raw, low_lo, low_den, pixel, valid, in_h, in_w, out_h, out_w, F64)
        if TANH:
            scaled = _divide(up - tl.load(ranges + 2), tl.load(ranges + 3), F64)
            acc = _nan_max(
                acc, _tanh(_divide(2.0 * scaled, tl.load(ranges + 4), F64), F64, PRECISE)
            )
        else:
            acc = acc + tl.where(up < 0, 0.0, up)
    if not TANH:
        acc = _divide(acc, tl.zeros([BLOCK], dtype) + layers.to(dtype), F64)
    tl.store(out_ptr + n * out_pixels + pixel, acc, mask=valid)
    lo, hi = _min_max(acc, valid)
    tl.store(partial_ptr + (n * blocks + b) * 2 + 0, lo)
    tl.store(partial_ptr + (n * blocks + b) * 2 + 1, hi)


@triton.jit(do_not_specialize=["out_pixels", "blocks"])
def _rescale_kernel(
    out_ptr,
    partial_ptr,
    out_pixels,
    blocks,
    EPS: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    """min-max of one block of pixels of one image, with the range merged from its blocks."""
    n, b = image_and_block(blocks)
    k = tl.arange(0, BLOCKS)
    live = k < blocks
    block_lo = tl.load(partial_ptr + (n * blocks + k) * 2 + 0, mask=live, other=0.0)
    block_hi = tl.load(partial_ptr + (n * blocks + k) * 2 + 1, mask=live, other=0.0)
    lo, _ = _min_max(block_lo, live)
    _, hi = _min_max(block_hi, live)
    pixel = b * BLOCK + tl.arange(0, BLOCK)
    valid = pixel < out_pixels
    value = tl.load(out_ptr + n * out_pixels + pixel, mask=valid, other=0.0)
    scaled = _divide(value - lo, (hi - lo) + EPS, F64)
    tl.store(out_ptr + n * out_pixels + pixel, scaled, mask=valid)


@torch.library.custom_op("fastxai::fuse_maps_triton", mutates_args=())
def fuse_maps_triton(raws: list[Tensor], height: int, width: int, fusion: str) -> Tensor:
    """Triton ``fuse_maps``: ``(N, h_l, w_l)`` maps of L layers -> ``(N, height, width)``."""
    with on_device_of(*raws):
        check_fuse_maps_inputs(raws, height, width, fusion)
        first = raws[0]
        torch._check(
            first.dtype in (torch.float32, torch.float64),
            lambda: f"fuse_maps: Triton takes float32 or float64 maps, got {first.dtype}",
        )
        n = first.shape[0]
        out = first.new_empty((n, height, width))
        if n == 0:
            return out
        f64 = first.dtype == torch.float64
        tanh = fusion == "tanh"
        pixels = height * width
        block = _block(first, pixels)
        flats = [r.contiguous().view(-1) for r in raws]
        flat = torch.cat(flats)
        starts = [0]
        for f in flats[:-1]:
            starts.append(starts[-1] + f.numel())
        offsets = torch.tensor(starts, dtype=torch.int64, device=first.device)
        sizes = torch.tensor(
            [s for r in raws for s in (r.shape[1], r.shape[2])],
            dtype=torch.int32,
            device=first.device,
        )
        ranges = first.new_zeros((len(raws), n, _RANGE_FIELDS))
        for index, raw in enumerate(raws):
            _layer_range_kernel[(n,)](
                flat[starts[index] :],
                ranges[index],
                raw.shape[1],
                raw.shape[2],
                height,
                width,
                EPS=MINMAX_EPS,
                UP_RANGE=tanh,
                F64=f64,
                BLOCK_LOW=_block(first, raw.shape[1] * raw.shape[2]),
                BLOCK=block,
            )
        blocks = triton.cdiv(pixels, block)
        partials = first.new_empty((n, blocks, 2))
        _fuse_kernel[(n * blocks,)](
            flat,
            offsets,
            sizes,
            ranges,
            out,
            partials,
            n,
            height,
            width,
            len(raws),
            blocks,
            TANH=tanh,
            F64=f64,
            PRECISE=precise_exp(first),
            BLOCK=block,
        )
        _rescale_kernel[(n * blocks,)](
            out,
            partials,
            pixels,
            blocks,
            EPS=MINMAX_EPS,
            F64=f64,
            BLOCK=block,
            BLOCKS=triton.next_power_of_2(blocks),
        )
        return out


fuse_maps_triton.register_fake(fuse_maps_fake)
