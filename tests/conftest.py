"""Shared fixtures: random-weight torchvision models (no downloads), randomised BN statistics."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
from pathlib import Path

import torch

# Triton kernels run under the interpreter where no GPU exists; it must be set before any
# @triton.jit kernel is defined, so before fastxai.ops.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torchvision
from torch import nn


def randomise_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics so eval-mode nets are not degenerate."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
    return model


@functools.lru_cache(maxsize=8)
def _cached_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=1000)
    with torch.no_grad():
        randomise_batchnorm(model, torch.Generator().manual_seed(1))
    return model.eval()


@pytest.fixture
def tv_model():
    """Factory: ``tv_model("resnet18")`` -> a cached eval-mode model with random weights."""
    return _cached_model


@pytest.fixture
def images():
    """Factory: ``images(n, size)`` -> normalised-looking random images, fixed seed."""

    def make(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, size, size, generator=g)

    return make


REPO_ROOT = Path(__file__).resolve().parent.parent


def run_python(script: str, **environment: str | None) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter from the repository, with ``environment`` changed
    (a ``None`` value removes the variable)."""
    env = dict(os.environ)
    for name, value in environment.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_without_extension(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter with ``FASTXAI_DISABLE_EXT=1`` (the fallback path)."""
    return run_python(script, FASTXAI_DISABLE_EXT="1")


HAS_GPU = torch.cuda.is_available()
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_backend_params(op: str, *, reference: bool = False) -> list:
    """``(backend, device)`` pytest params for every kernel of ``fastxai::<op>``: C++ on the
    CPU, Triton under the interpreter, C++ CUDA and Triton on a GPU, each skipped with its reason
    where it cannot run here. ``reference=True`` adds the PyTorch reference (``"torch"``), for
    tests whose assertions do not go through the reference."""
    import fastxai.ops as ops
    from fastxai.ops._dispatch import CPP_OPS, CUDA_KERNELS

    has_cpp_op, cuda_built = CPP_OPS[op], CUDA_KERNELS[op]
    skip = pytest.mark.skipif
    params = [
        pytest.param(
            "cpp",
            "cpu",
            id="cpp-cpu",
            marks=skip(not has_cpp_op, reason=f"C++ {op} not available: {ops.extension_status()}"),
        ),
        pytest.param(
            "triton",
            "cpu",
            id="triton-interpreter",
            marks=skip(not TRITON_ON_CPU, reason="TRITON_INTERPRET is not set"),
        ),
        pytest.param(
            "cpp",
            "cuda",
            id="cpp-cuda",
            marks=skip(
                not (HAS_GPU and cuda_built),
                reason="needs a GPU and fastxai._C built with FASTXAI_CUDA=1",
            ),
        ),
        pytest.param(
            "triton", "cuda", id="triton-cuda", marks=skip(not HAS_GPU, reason="needs a GPU")
        ),
    ]
    if reference:
        params.append(pytest.param("torch", "cpu", id="reference-cpu"))
    return params


@contextlib.contextmanager
def triton_as_cpu_kernel(*op_names: str):
    """``torch.ops.fastxai.<op>`` with its Triton kernel (under the interpreter) as its CPU kernel
    for the duration: the op's schema, fake and autograd as a GPU without the C++ CUDA kernels
    runs them, on CPU tensors. Test-only; the C++ CPU kernel is back afterwards."""
    from fastxai.ops.triton import eager_kernel

    with torch.library._scoped_library("fastxai", "IMPL") as lib:
        for op in op_names:
            lib.impl(op, eager_kernel(op), "CPU", allow_override=True)
        yield


class Untraceable(nn.Module):
    """``net`` behind a forward that torch.fx cannot trace (a branch on the batch size), so its
    layers (``"net.<name>"``) are captured and re-run through the hook paths."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.training = net.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            raise ValueError("no images")
        return self.net(x)
