"""Which implementation of a fused op runs: the one backend chooser of every front door.

It returns ``"op"`` (call ``torch.ops.fastxai.<op>``: the dispatcher runs the kernel registered
for the tensors' device, the C++ kernel on the CPU, the C++ CUDA kernel or else the Triton kernel
on a GPU; :mod:`fastxai.ops._registrations`), ``"triton"`` (the Triton kernel called directly)
or ``"torch"`` (the PyTorch reference, :mod:`fastxai.ops.reference`).

``backend="auto"`` calls the op where it has a kernel for the device, and the reference for
anything else: no extension, dtypes other than float32 and float64, mixed dtypes or devices,
other device types, and inputs that need a gradient on ops whose kernels have no backward.
``"cpp"``, ``"triton"`` and ``"torch"`` force one (for tests and benchmarks): ``"cpp"`` the C++
kernel of the tensors' device; ``"triton"`` the Triton kernel (through the op where it is the
op's CUDA kernel, directly otherwise: on CPU tensors under ``TRITON_INTERPRET=1``, or beside the
C++ CUDA kernels). A forced kernel refuses dtypes it has no kernel for with one line.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from fastxai.ops._cam_prior_formulas import FORMULAS
from fastxai.ops._extension import extension_status, registered_kernel
from fastxai.ops._registrations import FAKES
from fastxai.ops.triton import direct_kernel

Backend = Literal["auto", "cpp", "triton", "torch"]
BACKENDS = ("auto", "cpp", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float64)

# Every op with a front door (the backward ops run inside their op's autograd formula).
OPS = tuple(op for op in FAKES if not op.endswith("_backward"))
DIFFERENTIABLE_KERNELS = frozenset(FORMULAS)  # the ops whose kernels have a backward

# Looked up once: torch.compile cannot trace the dispatcher query.
CPP_OPS = {op: registered_kernel(op, "cpu") == "cpp" for op in OPS}
CUDA_KERNELS = {op: registered_kernel(op, "cuda") == "cpp" for op in OPS}
TRITON_CUDA_KERNELS = {op: registered_kernel(op, "cuda") == "triton" for op in OPS}


def _forced(op: str, tensors: Sequence[Tensor], backend: str) -> str:
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(
                f"{op}: the {backend!r} kernels take float32 or float64 tensors, got {t.dtype}; "
                "backend='auto' runs the PyTorch reference for other dtypes"
            )
    device = tensors[0].device.type
    if backend == "cpp":
        if registered_kernel(op, device) != "cpp":
            raise RuntimeError(
                f"{op}: backend='cpp' requested but there is no C++ {device} kernel: "
                f"{extension_status()}"
            )
        return "op"
    if device == "cuda" and TRITON_CUDA_KERNELS[op]:
        return "op"
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError(f"{op}: backend='triton' requested but triton is not installed")
    return "triton"


def choose_backend(op: str, tensors: Sequence[Tensor], backend: str) -> str:
    """``"op"``, ``"triton"`` or ``"torch"`` for ``op`` on ``tensors`` (its floating-point
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
        return "op" if CPP_OPS[op] else "torch"
    if first.device.type == "cuda":
        return "op" if CUDA_KERNELS[op] or TRITON_CUDA_KERNELS[op] else "torch"
    return "torch"


def kernel(op: str, chosen: str) -> Callable[..., Any]:
    """The callable of a kernel that :func:`choose_backend` chose (``"op"`` or ``"triton"``)."""
    return getattr(torch.ops.fastxai, op) if chosen == "op" else direct_kernel(op)
