"""Triton kernels of Layer-CAM's raw map and its backward.

:math:`M = \\mathrm{ReLU}(\\sum_k \\mathrm{ReLU}(g_k) \\odot A_k)` per image; backward
:math:`\\partial L/\\partial g_k = G\\,[M > 0]\\,[g_k > 0]\\,A_k` and
:math:`\\partial L/\\partial A_k = G\\,[M > 0]\\,\\mathrm{ReLU}(g_k)`,
with :math:`G = \\partial L/\\partial M`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastxai.ops.triton._launch import image_and_block, launch

# (channels, pixels) per program. The interpreter (CPU tensors) pays per program, so it gets one
# large block; GPUs get many small ones.
_GPU_BLOCK = (16, 128)
_INTERPRETER_BLOCK = (64, 1024)


@triton.jit
def _layercam_forward_kernel(
    gradient_ptr,
    activation_ptr,
    map_ptr,
    channels,
    width,
    pixels,
    blocks,
    g_stride_n,
    g_stride_c,
    g_stride_h,
    g_stride_w,
    a_stride_n,
    a_stride_c,
    a_stride_h,
    a_stride_w,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    n, block = image_and_block(blocks)
    pixel = block * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_in = pixel < pixels
    y = pixel // width
    x = pixel % width
    g_base = gradient_ptr + n * g_stride_n + y * g_stride_h + x * g_stride_w
    a_base = activation_ptr + n * a_stride_n + y * a_stride_h + x * a_stride_w
    total = tl.zeros([BLOCK_P], dtype=map_ptr.dtype.element_ty)
    for c0 in range(0, channels, BLOCK_C):
        channel = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        inside = (channel < channels)[:, None] & pixel_in[None, :]
        g = tl.load(g_base[None, :] + channel[:, None] * g_stride_c, mask=inside, other=0.0)
        a = tl.load(a_base[None, :] + channel[:, None] * a_stride_c, mask=inside, other=0.0)
        total += tl.sum(tl.where(g < 0, 0.0, g) * a, axis=0)
    tl.store(map_ptr + n * pixels + pixel, tl.where(total < 0, 0.0, total), mask=pixel_in)


@triton.jit
def _layercam_backward_kernel(
    grad_map_ptr,
    map_ptr,
    gradient_ptr,
    activation_ptr,
    grad_gradient_ptr,
    grad_activation_ptr,
    channels,
    width,
    pixels,
    blocks,
    g_stride_n,
    g_stride_c,
    g_stride_h,
    g_stride_w,
    a_stride_n,
    a_stride_c,
    a_stride_h,
    a_stride_w,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    n, block = image_and_block(blocks)
    pixel = block * BLOCK_P + tl.arange(0, BLOCK_P)
    channel = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    pixel_in = pixel < pixels
    inside = (channel < channels)[:, None] & pixel_in[None, :]
    y = pixel // width
    x = pixel % width

    upstream = tl.load(grad_map_ptr + n * pixels + pixel, mask=pixel_in, other=0.0)
    saved_map = tl.load(map_ptr + n * pixels + pixel, mask=pixel_in, other=0.0)
    # Selects, as ATen's threshold_backward: a zero branch stays 0 even next to inf.
    sum_gradient = tl.where(saved_map <= 0, 0.0, upstream)[None, :]

    g_offset = n * g_stride_n + channel[:, None] * g_stride_c + (y * g_stride_h + x * g_stride_w)
    a_offset = n * a_stride_n + channel[:, None] * a_stride_c + (y * a_stride_h + x * a_stride_w)
    g = tl.load(gradient_ptr + g_offset, mask=inside, other=0.0)
    a = tl.load(activation_ptr + a_offset, mask=inside, other=0.0)
    out_offset = (n * channels + channel[:, None]) * pixels + pixel[None, :]
    tl.store(grad_gradient_ptr + out_offset, tl.where(g <= 0, 0.0, sum_gradient * a), mask=inside)
    tl.store(grad_activation_ptr + out_offset, sum_gradient * tl.where(g < 0, 0.0, g), mask=inside)


def _check_inputs(gradient: Tensor, activation: Tensor) -> None:
    if gradient.dim() != 4:
        raise ValueError(f"layercam: gradient must be (N, C, h, w), got {gradient.dim()} dims")
    if activation.shape != gradient.shape:
        raise ValueError(
            f"layercam: activation must have the shape of gradient {tuple(gradient.shape)}, "
            f"got {tuple(activation.shape)}"
        )
    if activation.dtype != gradient.dtype or activation.device != gradient.device:
        raise ValueError("layercam: activation must have the dtype and device of gradient")


def _blocks(t: Tensor) -> tuple[int, int]:
    return _INTERPRETER_BLOCK if t.device.type == "cpu" else _GPU_BLOCK


def _launch_over_pixels(
    kernel, pointers: tuple[Tensor, ...], gradient: Tensor, activation: Tensor, split: bool
) -> None:
    """``kernel(*pointers, channels, width, pixels, blocks, *strides)`` over blocks of pixels of
    every image; with ``split`` also over blocks of channels (grid axis 1)."""
    images, channels, height, width = gradient.shape
    block_c, block_p = _blocks(gradient)
    block_p = min(block_p, triton.next_power_of_2(height * width))
    blocks = triton.cdiv(height * width, block_p)
    grid: tuple[int, ...] = (images * blocks,)
    if split:
        block_c = min(block_c, triton.next_power_of_2(channels))
        grid = (images * blocks, triton.cdiv(channels, block_c))
    launch(kernel)[grid](
        *pointers,
        channels,
        width,
        height * width,
        blocks,
        *gradient.stride(),
        *activation.stride(),
        BLOCK_C=block_c,
        BLOCK_P=block_p,
    )


def layercam(gradient: Tensor, activation: Tensor) -> Tensor:
    r"""Layer-CAM raw map :math:`\mathrm{ReLU}(\sum_k \mathrm{ReLU}(g_k) A_k)`.

    ``(N, C, h, w)`` twice -> ``(N, h, w)``.
    """
    _check_inputs(gradient, activation)
    images, _, height, width = gradient.shape
    out = gradient.new_empty((images, height, width))
    if out.numel() > 0:
        pointers = (gradient, activation, out)
        _launch_over_pixels(_layercam_forward_kernel, pointers, gradient, activation, split=False)
    return out


def layercam_backward(
    grad_map: Tensor, gradient: Tensor, activation: Tensor, map: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`layercam` with respect to ``gradient`` and ``activation``."""
    _check_inputs(gradient, activation)
    grad_gradient = gradient.new_empty(gradient.shape)
    grad_activation = gradient.new_empty(gradient.shape)
    if grad_gradient.numel() > 0:
        upstream = (grad_map.contiguous(), map.contiguous(), gradient, activation)
        pointers = (*upstream, grad_gradient, grad_activation)
        _launch_over_pixels(_layercam_backward_kernel, pointers, gradient, activation, split=True)
    return grad_gradient, grad_activation
