"""Which implementation of a fused op runs: the one backend chooser of every front door.

``backend="auto"``: the C++ kernel on the CPU (when ``fastxai._C`` has the op), on a GPU the C++
CUDA kernel when built and otherwise the Triton kernel, and the PyTorch reference
(:mod:`fastxai.ops.reference`) for anything else: other dtypes (float16, bfloat16), mixed dtypes
or devices, other device types, ops without a kernel there, and inputs that need a gradient on
ops whose kernels have no backward. ``"cpp"``, ``"triton"`` and ``"torch"`` force one (for tests
and benchmarks); a forced kernel refuses dtypes it has no kernel for with one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from fastxai.ops._extension import extension_status, has_extension

Backend = Literal["auto", "cpp", "triton", "torch"]
BACKENDS = ("auto", "cpp", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float64)

OPS = (
    "scale_maps",
    "fuse_maps",
    "layercam",
    "mask_priors",
    "tft_ladder",
    "tft_ladder_out",
    "tft_mask",
    "rpi_select",
)
TRITON_OPS = frozenset(OPS) - {"scale_maps"}
DIFFERENTIABLE_KERNELS = frozenset({"layercam", "mask_priors"})


def _cpp_op(op: str) -> bool:
    return has_extension() and hasattr(torch.ops.fastxai, op)


# Looked up once: torch.compile cannot trace the dispatcher query. (An extension built before an
# op existed loads without it.)
CPP_OPS = {op: _cpp_op(op) for op in OPS}
CUDA_KERNELS = {
    op: CPP_OPS[op] and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastxai::{op}", "CUDA")
    for op in OPS
}


def _forced(op: str, tensors: Sequence[Tensor], backend: str) -> str:
    if backend == "cpp" and not CPP_OPS[op]:
        raise RuntimeError(f"{op}: backend='cpp' requested but {extension_status()}")
    if backend == "triton" and op not in TRITON_OPS:
        raise ValueError(f"{op}: there is no Triton kernel; use backend='auto', 'cpp' or 'torch'")
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(
                f"{op}: the {backend!r} kernels take float32 or float64 tensors, got {t.dtype}; "
                "backend='auto' runs the PyTorch reference for other dtypes"
            )
    return backend


def choose_backend(op: str, tensors: Sequence[Tensor], backend: str) -> str:
    """``"cpp"``, ``"triton"`` or ``"torch"`` for ``op`` on ``tensors`` (its floating-point
    inputs, which a kernel needs in one dtype and on one device)."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend != "auto":
        return _forced(op, tensors, backend)
    first = tensors[0]
    if first.dtype not in KERNEL_DTYPES or any(
        t.dtype != first.dtype or t.device != first.device for t in tensors
    ):
        return "torch"
    if (
        op not in DIFFERENTIABLE_KERNELS
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
    ):
        return "torch"
    if first.device.type == "cpu":
        return "cpp" if CPP_OPS[op] else "torch"
    if first.device.type == "cuda":
        if CUDA_KERNELS[op]:
            return "cpp"
        return "triton" if op in TRITON_OPS else "torch"
    return "torch"
