"""Helpers shared by the Triton kernels: launches, grids, precise ``exp``.

Launches go through :func:`launch` (``torch.library.wrap_triton``): traced, they become graph
nodes Inductor can see; run eagerly they launch directly (see :mod:`fastxai.ops.triton`).

Grids are one-dimensional: CUDA allows 2**31 - 1 programs on axis 0 but 65535 on axes 1 and 2,
which (image, block) grids exceed for maps of more than 64 M pixels or batches of more than
65535 planes. Kernels fold the pair into axis 0 (:func:`image_and_block`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice


def launch(kernel):
    """``kernel[grid](...)`` as a launch that tracing records (``torch.library.wrap_triton``)."""
    return torch.library.wrap_triton(kernel)


@triton.jit
def image_and_block(blocks):
    """(image, block) of this program in a grid of ``images * blocks`` programs."""
    pid = tl.program_id(0).to(tl.int64)
    return pid // blocks, pid % blocks


@triton.jit
def divide(a, b, F64: tl.constexpr):
    """a / b rounded as IEEE: Triton's float32 ``/`` may be approximate on GPUs, and ``div_rn``
    takes float32 only."""
    if F64:
        return a / b
    else:
        return tl.div_rn(a, b)


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
