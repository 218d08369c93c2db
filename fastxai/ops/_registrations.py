"""Every Python registration of the ``torch.ops.fastxai`` ops, in one place.

``fastxai._C`` declares the schemas (``csrc/fastxai.cpp``) and registers the C++ kernels per
dispatch key (CPU; CUDA when built with it). This module adds, per op, its one fake kernel, its
one autograd formula where it is differentiable, and, where the extension has no CUDA kernel
and Triton is installed, the Triton kernel as the op's CUDA kernel. Traced (``torch.compile``,
AOT), such an op on CUDA tensors decomposes into its Triton launches, as a
``torch.library.triton_op`` would, so Inductor sees the kernels; on other devices, and under
``torch.export``, it stays one op call.

:func:`register` runs once, from :mod:`fastxai.ops._extension`, after ``fastxai._C`` loads.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from fastxai.ops._cam_prior_formulas import (
    FORMULAS,
    layercam_backward_fake,
    layercam_fake,
    mask_priors_backward_fake,
    mask_priors_fake,
)
from fastxai.ops._maps_checks import fuse_maps_fake, scale_maps_fake
from fastxai.ops._tft_checks import (
    rpi_select_fake,
    tft_ladder_fake,
    tft_ladder_out_fake,
    tft_mask_fake,
)

FAKES = {
    "scale_maps": scale_maps_fake,
    "fuse_maps": fuse_maps_fake,
    "layercam": layercam_fake,
    "layercam_backward": layercam_backward_fake,
    "mask_priors": mask_priors_fake,
    "mask_priors_backward": mask_priors_backward_fake,
    "tft_ladder": tft_ladder_fake,
    "tft_ladder_out": tft_ladder_out_fake,
    "tft_mask": tft_mask_fake,
    "rpi_select": rpi_select_fake,
}

# op -> {"cpu": kernel, "cuda": kernel}, kernel "cpp", "triton" or None (no kernel)
KernelTable = dict[str, dict[str, str | None]]


def _has_cpp_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastxai::{op}", key)


def _export_keeps_ops() -> bool:
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:  # pragma: no cover - older torch
        return False
    return custom_triton_ops_decomposition_disabled()


def _register_triton_cuda_kernel(op: str) -> None:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    from fastxai.ops import triton as triton_kernels

    name = f"fastxai::{op}"

    def cuda_kernel(*args: Any) -> Any:
        return triton_kernels.eager_kernel(op)(*args)

    def decompose_on_cuda(mode: Any, func: Any, types: tuple, args: tuple, kwargs: dict) -> Any:
        if triton_kernels.first_cuda_tensor(args) is None or _export_keeps_ops():
            return mode.__torch_dispatch__(func, types, args, kwargs)
        known = (torch.Tensor, FunctionalTensor)
        if any(not (issubclass(t, FakeTensor) or t in known) for t in types):
            return NotImplemented
        with mode:
            return triton_kernels.traceable_kernel(op)(*args, **kwargs)

    torch.library.register_kernel(name, "cuda", cuda_kernel)
    torch.library.register_torch_dispatch(name, FunctionalTensorMode, decompose_on_cuda)


def register() -> KernelTable:
    """Register the fakes, autograd formulas and Triton CUDA kernels; returns which kernel each op
    has on each device. (An extension built before an op existed loads without it.)"""
    ops = [op for op in FAKES if hasattr(torch.ops.fastxai, op)]
    table: KernelTable = {
        op: {
            "cpu": "cpp" if _has_cpp_kernel(op, "CPU") else None,
            "cuda": "cpp" if _has_cpp_kernel(op, "CUDA") else None,
        }
        for op in ops
    }
    for op in ops:
        torch.library.register_fake(f"fastxai::{op}")(FAKES[op])
    for op, formula in FORMULAS.items():
        if op in table and f"{op}_backward" in table:
            setup_context, backward = formula(getattr(torch.ops.fastxai, f"{op}_backward"))
            torch.library.register_autograd(f"fastxai::{op}", backward, setup_context=setup_context)
    if importlib.util.find_spec("triton") is not None:
        for op in ops:
            if table[op]["cuda"] is None:
                _register_triton_cuda_kernel(op)
                table[op]["cuda"] = "triton"
    return table
