"""Front doors of ``fastxai::layercam`` and ``fastxai::mask_priors``.

Backends (:func:`fastxai.ops._dispatch.choose_backend`): ``"auto"`` calls the op (C++ on the
CPU; C++ CUDA or Triton on a GPU) and the pure-PyTorch reference for anything else (other dtypes
or devices, no extension); ``"cpp"``, ``"triton"`` and ``"torch"`` force one. Every backend is
differentiable, the kernels through the op's one autograd formula.
"""

from __future__ import annotations

from torch import Tensor

import fastxai.ops.reference as reference
from fastxai.ops._dispatch import Backend, choose_backend, kernel


def layercam(gradient: Tensor, activation: Tensor, *, backend: Backend = "auto") -> Tensor:
    r"""Layer-CAM's raw map :math:`M = \mathrm{ReLU}(\sum_k \mathrm{ReLU}(g_k) \odot A_k)`.

    ``gradient`` (:math:`g = \partial y / \partial A`) and ``activation`` (:math:`A`) are
    ``(N, C, h, w)`` of one dtype and device; returns ``(N, h, w)``. Fused: each input is read
    once. Differentiable in both inputs, with :math:`G = \partial L/\partial M`:
    :math:`\partial L/\partial g_k = G [M > 0] [g_k > 0] A_k` and
    :math:`\partial L/\partial A_k = G [M > 0] \mathrm{ReLU}(g_k)`.
    """
    chosen = choose_backend("layercam", (gradient, activation), backend)
    if chosen != "torch":
        return kernel("layercam", chosen)(gradient, activation)
    return reference.layercam(gradient, activation)


def mask_priors(p: Tensor, neighbours: int = 4, *, backend: Backend = "auto") -> Tensor:
    r"""Per-sample mask priors ``(N, 3)``: [area, binarisation, total variation] of ``p``.

    For masks ``p`` of shape ``(N, C, H, W)`` (usually ``C = 1``), each a mean over the sample:
    :math:`\overline{p}`, :math:`\overline{p (1 - p)}`, and
    :math:`\overline{|p_{i+1,j} - p_{i,j}|} + \overline{|p_{i,j+1} - p_{i,j}|}`; ``neighbours=8``
    adds the two diagonal directions' means, each weighted :math:`1/\sqrt2`. A direction without
    pairs contributes 0. One read of ``p``; the backward is analytic (sign(0) = 0 for ``|.|``).
    Per-sample terms, so callers weigh and reduce them (``torch.func.grad`` cannot see through
    the custom op; use ``.backward()`` or ``torch.autograd.grad``).
    """
    chosen = choose_backend("mask_priors", (p,), backend)
    if chosen != "torch":
        return kernel("mask_priors", chosen)(p, neighbours)
    return reference.mask_priors(p, neighbours)
