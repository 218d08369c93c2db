"""The one backend chooser of the fused ops: what ``"auto"`` picks, and a forced kernel refusing
what it cannot run with one line."""

from __future__ import annotations

import pytest
import torch

import fastxai.ops as ops
from fastxai.ops._dispatch import CPP_OPS, OPS, choose_backend


def _inputs(dtype: torch.dtype = torch.float32, requires_grad: bool = False) -> tuple:
    t = torch.rand(2, 3, 4, 4, dtype=dtype).requires_grad_(requires_grad)
    return (t, torch.rand(2, 3, 4, 4, dtype=dtype))


@pytest.mark.parametrize("op", OPS)
def test_auto_runs_the_kernel_for_float_cpu_tensors_and_the_reference_otherwise(op: str) -> None:
    kernel = "op" if CPP_OPS[op] else "torch"
    assert choose_backend(op, _inputs(torch.float32), "auto") == kernel
    assert choose_backend(op, _inputs(torch.float64), "auto") == kernel
    for dtype in (torch.float16, torch.bfloat16):
        assert choose_backend(op, _inputs(dtype), "auto") == "torch"
    mixed = (torch.rand(2, 3), torch.rand(2, 3, dtype=torch.float64))
    assert choose_backend(op, mixed, "auto") == "torch"
    needs_grad = choose_backend(op, _inputs(requires_grad=True), "auto")
    assert needs_grad == (kernel if op in ("layercam", "mask_priors") else "torch")
    with torch.no_grad():
        assert choose_backend(op, _inputs(requires_grad=True), "auto") == kernel
    assert choose_backend(op, _inputs(), "torch") == "torch"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_a_forced_kernel_refuses_half_precision_in_one_line(op: str, backend: str) -> None:
    if backend == "cpp" and not CPP_OPS[op]:
        with pytest.raises(RuntimeError, match=f"{op}: backend='cpp' requested"):
            choose_backend(op, _inputs(), backend)
        return
    # On CPU tensors "cpp" calls the op (its C++ kernel), "triton" the Triton kernel directly.
    assert choose_backend(op, _inputs(), backend) == {"cpp": "op", "triton": "triton"}[backend]
    with pytest.raises(ValueError, match=f"^{op}: the '{backend}' kernels take float32 or float64"):
        choose_backend(op, _inputs(torch.bfloat16), backend)


def test_front_doors_refuse_unknown_backends_and_forced_half_precision() -> None:
    g, a = _inputs(torch.float16)
    with pytest.raises(ValueError, match=r"layercam: the 'triton' kernels take .* torch.float16"):
        ops.layercam(g, a, backend="triton")
    with pytest.raises(ValueError, match="mask_priors: backend must be one of"):
        ops.mask_priors(torch.rand(1, 1, 4, 4), backend="cuda")
    torch.testing.assert_close(ops.layercam(g, a), ops.reference.layercam(g, a))  # auto
