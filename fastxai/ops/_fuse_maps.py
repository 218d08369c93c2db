"""Front door of ``fastxai::fuse_maps``, with the fake registration of its C++ op.

Backends: ``"auto"`` runs the C++ kernel for CPU tensors when ``fastxai._C`` has it, the CUDA
kernel for CUDA tensors when the extension was built with it and Triton otherwise, and the
pure-PyTorch reference for anything else (other or mixed dtypes, other devices, maps that require
grad: the kernels have no backward, the reference is differentiable). ``"cpp"``, ``"triton"`` and
``"torch"`` force one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from fastxai.ops import reference
from fastxai.ops._dispatch import CPP_OPS, Backend, choose_backend
from fastxai.ops._fuse_maps_checks import FUSIONS, fuse_maps_fake

Fusion = Literal["mean", "tanh"]


def fuse_maps(
    raws: Sequence[Tensor],
    size: tuple[int, int],
    fusion: Fusion = "mean",
    *,
    backend: Backend = "auto",
) -> Tensor:
    r"""Several layers' raw maps ``(N, h_l, w_l)`` upsampled to ``size`` and fused: ``(N, H, W)``.

    ``"mean"``: :math:`\mathrm{mm}(\tfrac1L \sum_l \mathrm{relu}(\mathrm{up}(\mathrm{mm}(
    \mathrm{relu}(r_l)))))`; ``"tanh"``: :math:`\mathrm{mm}(\max_l \tanh(2 M_l / \max(\max M_l,
    10^{-7})))` with :math:`M_l` the :func:`~fastxai.ops.scale_maps` of layer ``l``
    (:func:`fastxai.ops.reference.fuse_maps`). The kernels write the output in one pass per image,
    without the ``(N, L, H, W)`` stack of upsampled maps.
    """
    raws = list(raws)
    if not raws:
        raise ValueError("fuse_maps: raws must hold at least one map")
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be 'mean' or 'tanh', got {fusion!r}")
    height, width = int(size[0]), int(size[1])
    chosen = choose_backend("fuse_maps", raws, backend)
    if backend == "auto" and chosen == "cpp" and raws[0].is_cuda and len(raws) > 16:
        chosen = "triton"  # the CUDA kernel passes at most 16 layers' pointers in one argument
    if chosen == "cpp":
        return torch.ops.fastxai.fuse_maps(raws, height, width, fusion)
    if chosen == "triton":
        from fastxai.ops.triton.fuse_maps import fuse_maps_triton

        return fuse_maps_triton(raws, height, width, fusion)
    return reference.fuse_maps(raws, height, width, fusion)


if CPP_OPS["fuse_maps"]:
    torch.library.register_fake("fastxai::fuse_maps")(fuse_maps_fake)
