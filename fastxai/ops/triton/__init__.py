"""Triton kernels of the fused ops: on a GPU without the C++ CUDA kernels, the CUDA kernels of
the same ``torch.ops.fastxai`` ops.

Each module (file stem as ``csrc/cpu/<op>.cpp``; ``scale_maps`` lives with ``fuse_maps``) defines
plain functions with the signature of an op's schema. Their launches go through
``torch.library.wrap_triton``, so a traced graph (``torch.compile``, ``make_fx``) holds the
Triton kernels themselves and Inductor can schedule them, rather than an opaque op call
(:mod:`fastxai.ops._registrations` registers them). :func:`eager_kernel` is the function as the
dispatcher runs it: on the device of its tensors, its launches direct. The modules load on first
use, so importing fastxai defines no kernel, and ``TRITON_INTERPRET=1`` (no GPU) can still be set
before the first ``@triton.jit`` kernel exists.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# op -> (module in this package, function)
IMPLEMENTATIONS = {
    "scale_maps": ("fuse_maps", "scale_maps"),
    "fuse_maps": ("fuse_maps", "fuse_maps"),
    "layercam": ("layercam", "layercam"),
    "layercam_backward": ("layercam", "layercam_backward"),
    "mask_priors": ("mask_priors", "mask_priors"),
    "mask_priors_backward": ("mask_priors", "mask_priors_backward"),
    "tft_ladder": ("tft_ladder", "tft_ladder"),
    "tft_ladder_out": ("tft_ladder", "tft_ladder_out"),
    "tft_mask": ("tft_ladder", "tft_mask"),
    "rpi_select": ("rpi_select", "rpi_select"),
}


def traceable_kernel(op: str) -> Callable[..., Any]:
    """The Triton implementation of ``fastxai::<op>``, traceable (launches via ``wrap_triton``)."""
    module, name = IMPLEMENTATIONS[op]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def first_cuda_tensor(args: tuple) -> Tensor | None:
    """The first CUDA tensor among an op's arguments (tensors or lists of them), if any."""
    for arg in args:
        for t in arg if isinstance(arg, (list, tuple)) else (arg,):
            if isinstance(t, Tensor) and t.device.type == "cuda":
                return t
    return None


def on_device_of(*args: Any) -> contextlib.AbstractContextManager:
    """``torch.cuda.device`` of the first CUDA tensor in ``args``, a no-op when there is none. A
    Triton launch runs on the current CUDA device whatever device its tensors are on: tensors on
    ``cuda:1`` while ``cuda:0`` is current would be read from the wrong device."""
    t = first_cuda_tensor(args)
    return contextlib.nullcontext() if t is None else torch.cuda.device(t.device)


def _direct_launches() -> contextlib.AbstractContextManager:
    # Outside tracing, plain tensors need no higher-order-op dispatch (about a millisecond).
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # pragma: no cover - older torch: launches still work, only slower
        return contextlib.nullcontext()
    return set_wrap_triton_enabled(False)


@functools.cache
def eager_kernel(op: str) -> Callable[..., Any]:
    """The Triton implementation of ``fastxai::<op>`` as the dispatcher runs it."""
    implementation = traceable_kernel(op)

    @functools.wraps(implementation)
    def run(*args: Any) -> Any:
        with on_device_of(*args), _direct_launches():
            return implementation(*args)

    return run


@functools.cache
def direct_kernel(op: str) -> Callable[..., Any]:
    """The Triton kernel of ``op`` called outside the dispatcher (``backend="triton"``): for the
    interpreter's CPU tensors and for comparing Triton with the C++ CUDA kernels. Differentiable
    ops get the op's own autograd formula, with the Triton backward kernel."""
    from fastxai.ops._cam_prior_formulas import FORMULAS, differentiable

    if op not in FORMULAS:
        return eager_kernel(op)
    return differentiable(eager_kernel(op), FORMULAS[op](eager_kernel(f"{op}_backward")))
