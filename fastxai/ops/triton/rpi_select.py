"""Triton kernel of TFT's epilogue ``rpi_select``, one program per image.

For the image's ladder rows :math:`\\ell_{n,t}` (``(N * T, K)`` logits):
:math:`p = \\exp(\\ell_c - m) / \\sum_j \\exp(\\ell_j - m)` with :math:`m = \\max_j \\ell_j` (two
passes over the row, nothing of size K written), :math:`\\mathrm{RPI} = \\max(p - p^0, 0) / p^0`,
and the first argmax over the T rows, -1 when it is not positive; :math:`p` is written too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastxai.ops._tft_checks import check_select_inputs
from fastxai.ops.triton._launch import divide, exp, launch, precise_exp

# Logits per load. The interpreter (CPU tensors) pays per step, so it gets large blocks.
_GPU_BLOCK = 1024
_INTERPRETER_BLOCK = 1 << 14


@triton.jit(do_not_specialize=["thresholds", "classes"])
def _rpi_select_kernel(
    logits_ptr,
    class_ptr,
    original_ptr,
    rpi_ptr,
    index_ptr,
    probability_ptr,
    thresholds,
    classes,
    F64: tl.constexpr,
    PRECISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    dtype = logits_ptr.dtype.element_ty
    target = tl.load(class_ptr + n)
    original = tl.load(original_ptr + n)
    best = tl.full([], float("-inf"), dtype)
    best_t = tl.full([], 0, tl.int64)
    for t in range(0, thresholds):
        row = logits_ptr + (n * thresholds + t) * classes
        row_max = tl.full([], float("-inf"), dtype)
        for start in range(0, classes, BLOCK):
            offset = start + tl.arange(0, BLOCK)
            logit = tl.load(row + offset, mask=offset < classes, other=float("-inf"))
            row_max = tl.maximum(row_max, tl.max(logit, axis=0))
        total = tl.zeros([], dtype)
        for start in range(0, classes, BLOCK):
            offset = start + tl.arange(0, BLOCK)
            logit = tl.load(row + offset, mask=offset < classes, other=float("-inf"))
            total += tl.sum(exp(logit - row_max, PRECISE), axis=0)
        # An out-of-range class reads nothing and yields NaN (checked on the host for the CPU).
        known = (target >= 0) & (target < classes)
        target_logit = tl.load(row + target, mask=known, other=float("nan"))
        probability = divide(exp(target_logit - row_max, PRECISE), total, F64)
        increase = probability - original
        rpi = divide(tl.where(increase < 0, 0.0, increase), original, F64)
        tl.store(rpi_ptr + n * thresholds + t, rpi)
        tl.store(probability_ptr + n * thresholds + t, probability)
        # First maximum, NaN counting as the maximum (torch.argmax).
        replaces = (rpi > best) | ((rpi != rpi) & (best == best)) | (t == 0)
        best = tl.where(replaces, rpi, best)
        best_t = tl.where(replaces, t, best_t)
    tl.store(index_ptr + n, tl.where(best > 0, best_t, -1))


def rpi_select(logits: Tensor, classes: Tensor, original: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """RPI curve ``(N, T)``, the selected threshold ``(N,)`` (-1: none) and the class
    probabilities ``(N, T)`` of ladder logits."""
    thresholds = check_select_inputs("rpi_select", logits, classes, original)
    n = classes.shape[0]
    rpi = logits.new_empty((n, thresholds))
    index = classes.new_empty((n,))
    probability = logits.new_empty((n, thresholds))
    if n == 0:
        return rpi, index, probability
    num_classes = logits.shape[1]
    cap = _INTERPRETER_BLOCK if logits.device.type == "cpu" else _GPU_BLOCK
    block = min(cap, triton.next_power_of_2(max(num_classes, 1)))
    launch(_rpi_select_kernel)[(n,)](
        logits.contiguous(),
        classes.contiguous(),
        original.contiguous(),
        rpi,
        index,
        probability,
        thresholds,
        num_classes,
        F64=logits.dtype == torch.float64,
        PRECISE=precise_exp(logits),
        BLOCK=block,
    )
    return rpi, index, probability
