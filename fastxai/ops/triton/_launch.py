"""Where Triton kernels launch: on the device of their tensors.

A Triton launch runs on the current CUDA device, whatever device its tensors are on, so each op
sets the device of its first tensor for its launches (tensors on ``cuda:1`` while ``cuda:0`` is
current would otherwise be read from the wrong device). CPU tensors (the interpreter) need
nothing.

Grids are one-dimensional: CUDA allows 2**31 - 1 programs on axis 0 but 65535 on axes 1 and 2,
which (image, block) grids exceed for maps of more than 64 M pixels or batches of more than
65535 planes. Kernels fold the pair into axis 0 (:func:`image_and_block`).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice


def on_device_of(*tensors: Tensor) -> contextlib.AbstractContextManager:
    """``torch.cuda.device`` of the first CUDA tensor of ``tensors``, a no-op when none is."""
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type == "cuda":
            return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@triton.jit
def image_and_block(blocks):
    """(image, block) of this program in a grid of ``images * blocks`` programs."""
    pid = tl.program_id(0).to(tl.int64)
    return pid // blocks, pid % blocks


@triton.jit
def exp(x, PRECISE: tl.constexpr):
    """e**x: libdevice's correctly rounded-to-a-few-ulps ``exp`` on a GPU (``tl.exp`` lowers to
    the approximate ``ex2.approx`` there), ``tl.exp`` in the interpreter (NumPy's, which has
    no libdevice)."""
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


def precise_exp(t: Tensor) -> bool:
    """The ``PRECISE`` argument of :func:`exp` for kernels on ``t``'s device."""
    return t.device.type == "cuda"
