"""The Triton kernels as the CUDA kernels of the ``fastxai`` ops themselves.

Without a GPU the launches cannot run, but tracing can: on fake CUDA tensors AOT autograd (what
``torch.compile`` runs before Inductor) must see each op's Triton launches
(``triton_kernel_wrapper_functional``) instead of an opaque op call, and on CPU tensors the one
op call (the C++ kernel). The kernels' values are checked against the reference elsewhere,
through the same functions, under the interpreter.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_python

import fastxai.ops as ops
from fastxai.ops._dispatch import CUDA_KERNELS, TRITON_CUDA_KERNELS, choose_backend
from fastxai.ops._registrations import FAKES

triton_is_the_cuda_kernel = pytest.mark.skipif(
    not (ops.has_extension() and all(TRITON_CUDA_KERNELS.values())),
    reason=f"the ops' CUDA kernels are not the Triton ones here: {ops.extension_status()}",
)

TRACE = r"""
import json, logging, sys
import torch
from torch._functorch.aot_autograd import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode

# Without a GPU Triton cannot analyse which arguments a kernel writes and assumes all; say so once.
logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.CRITICAL)
import fastxai.ops  # noqa: F401  (registers the ops' kernels)

kernel_modules = sorted(m for m in sys.modules if m.startswith("fastxai.ops.triton."))

fastxai = torch.ops.fastxai
CALLS = {
    "scale_maps": (lambda r: fastxai.scale_maps(r, 8, 9), [(2, 5, 6)]),
    "fuse_maps": (lambda a, b: fastxai.fuse_maps([a, b], 8, 9, "tanh"), [(2, 5, 6), (2, 3, 3)]),
    "layercam": (lambda g, a: fastxai.layercam(g, a), [(2, 4, 5, 6)] * 2),
    "layercam_backward": (
        lambda m, g, a, s: fastxai.layercam_backward(m, g, a, s),
        [(2, 5, 6), (2, 4, 5, 6), (2, 4, 5, 6), (2, 5, 6)],
    ),
    "mask_priors": (lambda p: fastxai.mask_priors(p, 8), [(2, 1, 5, 6)]),
    "mask_priors_backward": (
        lambda t, p: fastxai.mask_priors_backward(t, p, 8), [(2, 3), (2, 1, 5, 6)]
    ),
    "tft_ladder": (
        lambda r, x, t: fastxai.tft_ladder(r, x, t, "percentile", "soft"),
        [(2, 5, 6), (2, 3, 16, 16), (4,)],
    ),
    "tft_ladder_out": (
        lambda r, x, t, o: fastxai.tft_ladder_out(r, x, t, "value", "binary", o),
        [(2, 5, 6), (2, 3, 16, 16), (4,), (8, 3, 16, 16)],
    ),
    "tft_mask": (
        lambda m, x, t: fastxai.tft_mask(m, x, t, "value", "soft"),
        [(2, 16, 16), (2, 3, 16, 16), (4,)],
    ),
    "rpi_select": (
        lambda l, c, o: fastxai.rpi_select(l, c.long(), o), [(8, 10), (2,), (2,)]
    ),
}

class Captured(Exception):
    pass


def capture(gm, _inputs):
    raise Captured(gm.code)  # the graph is all we need: running it would need a GPU


result = {}
for device in ("cuda", "cpu"):
    for op, (call, shapes) in CALLS.items():
        with FakeTensorMode():
            args = [torch.empty(shape, device=device) for shape in shapes]
            code = None
            try:
                aot_function(call, fw_compiler=capture)(*args)
            except Captured as graph:
                code = graph.args[0]
        result[f"{device}:{op}"] = {
            "triton_launches": code.count("triton_kernel_wrapper_functional("),
            "op_calls": code.count(f"torch.ops.fastxai.{op}."),
        }
json.dump({"kernel_modules_at_import": kernel_modules, "traces": result}, sys.stdout)
"""


@triton_is_the_cuda_kernel
def test_traced_ops_on_cuda_tensors_are_their_kernel_launches_and_on_cpu_one_op_call():
    done = run_python(TRACE, TRITON_INTERPRET=None)
    assert done.returncode == 0, done.stderr[-3000:]
    output = json.loads(done.stdout)
    # the Triton kernel modules load when a kernel first runs or is traced, not at import
    assert output["kernel_modules_at_import"] == []
    result = output["traces"]
    for op in FAKES:
        on_cuda, on_cpu = result[f"cuda:{op}"], result[f"cpu:{op}"]
        assert on_cuda["triton_launches"] >= 1 and on_cuda["op_calls"] == 0, (op, on_cuda)
        assert on_cpu["triton_launches"] == 0 and on_cpu["op_calls"] == 1, (op, on_cpu)


@triton_is_the_cuda_kernel
def test_cuda_tensors_call_the_op_and_forcing_cpp_there_names_the_missing_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 4, 4, device="cuda")
        for op in TRITON_CUDA_KERNELS:
            assert choose_backend(op, (x,), "auto") == "op"
            assert choose_backend(op, (x,), "triton") == "op"  # the op's kernel is Triton
            assert choose_backend(op, (x.half(),), "auto") == "torch"
            with pytest.raises(RuntimeError, match=f"^{op}: backend='cpp' requested but there"):
                choose_backend(op, (x,), "cpp")
    assert not any(CUDA_KERNELS.values())
    assert ops.extension_status() == "fastxai._C loaded: CPU: C++ kernels; CUDA: Triton kernels"
