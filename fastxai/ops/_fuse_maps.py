"""Front door of ``fastxai::fuse_maps``.

Backends (:func:`fastxai.ops._dispatch.choose_backend`): ``"auto"`` calls the op (C++ on the
CPU; C++ CUDA or Triton on a GPU, Triton also for more layers than the C++ CUDA kernel takes) and
the pure-PyTorch reference for anything else (other or mixed dtypes, other devices, maps that
require grad: the kernels have no backward, the reference is differentiable). ``"cpp"``,
``"triton"`` and ``"torch"`` force one.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Literal

from torch import Tensor

import fastxai.ops.reference as reference
from fastxai.ops._dispatch import CUDA_KERNELS, Backend, choose_backend, kernel
from fastxai.ops._maps_checks import FUSIONS

Fusion = Literal["mean", "tanh"]
CUDA_MAX_LAYERS = 16  # the C++ CUDA kernel passes the layers' pointers in one argument


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
    too_many = raws[0].is_cuda and len(raws) > CUDA_MAX_LAYERS
    if backend == "auto" and chosen == "op" and too_many and CUDA_KERNELS["fuse_maps"]:
        chosen = "triton" if importlib.util.find_spec("triton") else "torch"
    if chosen != "torch":
        return kernel("fuse_maps", chosen)(raws, height, width, fusion)
    return reference.fuse_maps(raws, height, width, fusion)
