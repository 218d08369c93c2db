r"""The fast backward of one unit: gradient x input plus a norm-weighted bias term.

With :math:`\rho_q = R(q) / \|\hat v_q\|^2` (0 where :math:`\hat v_q = 0`) and the routing of the
merged max-pool fixed, the relevance a source gives its input PFV ``p`` is

.. math::
    R_{in}(p) = \sum_{ch} v_p \odot [J_L^\top(\hat v \rho)]_p
              + \sum_{(q,k) \to p} \rho_q \langle \beta, \hat v_q \rangle\,
                \frac{n_k(q)}{\sum_{k'} n_{k'}(q)}

where :math:`L(v) = W' * \mathrm{pool}(v)` and :math:`n_k(q) = \|c^0_k(q)\|` is the norm of the
raw contribution of part ``k`` (a tap, or a tap of one pool-window offset). The first term is one
convolution backward; only the second needs per-part norms, and only when there is a shift and
more than one part.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastxai.decomposition.taps import (
    fold_pool_offsets,
    fold_taps,
    pool_offset_masks,
    route_through_pool,
    tap_norms,
)
from fastxai.decomposition.trace import LinearSource, Unit

# Added to ||v_hat||^2 and to the sum of part norms (guards the empty parts; not in the paper).
EPS = 1e-12


def ratio_scale(preact: Tensor, relevance: Tensor) -> Tensor:
    r""":math:`\rho_q = R(q) / (\|\hat v_q\|^2 + \epsilon)`, 0 where :math:`\hat v_q = 0`."""
    norm2 = torch.linalg.vector_norm(preact, dim=1).square()
    return torch.where(norm2 > 0, relevance / (norm2 + EPS), torch.zeros_like(relevance))


def gradient_times_input(source: LinearSource, cotangent: Tensor) -> Tensor:
    r"""Term 1: :math:`\sum_{ch} v \odot J_L^\top(\mathrm{cotangent})` on the slot's grid."""
    if source.weight is None:
        grad = cotangent
    else:
        grad = torch.nn.grad.conv2d_input(
            source.inputs.shape,
            source.weight,
            cotangent,
            source.stride,
            source.padding,
            source.dilation,
            source.groups,
        )
    per_element = grad * source.inputs
    if source.pool is None:
        return per_element.sum(1)
    return route_through_pool(per_element, source.pool)


def _split_by_norms(bias_relevance: Tensor, norms: Tensor) -> Tensor:
    """Shares ``b_q * n_part(q) / sum n(q)`` over the part dims (all but batch and the last two);
    0 where every part of ``q`` is zero."""
    part_dims = tuple(range(1, norms.dim() - 2))
    total = norms.sum(part_dims, keepdim=True)
    b = bias_relevance.view(bias_relevance.shape[0], *([1] * len(part_dims)), *norms.shape[-2:])
    return torch.where(total > 0, b * norms / (total + EPS), torch.zeros_like(norms))


def bias_term(source: LinearSource, bias_relevance: Tensor, input_size: tuple[int, int]) -> Tensor:
    r"""Term 2: :math:`b_q = \rho_q\langle\beta,\hat v_q\rangle` split over the parts of ``q`` in
    proportion to their norms, scattered onto the slot's grid ``(N, H, W)``."""
    assert source.weight is not None
    out_size = (bias_relevance.shape[-2], bias_relevance.shape[-1])
    single_tap = source.weight.shape[-2:] == (1, 1)
    pool = source.pool
    if pool is None:
        if single_tap:
            return fold_taps(bias_relevance[:, None], source, input_size)
        shares = _split_by_norms(bias_relevance, tap_norms(source, source.inputs, out_size))
        return fold_taps(shares, source, input_size)
    masks = pool_offset_masks(pool)
    norms = torch.stack([tap_norms(source, pool.pooled * m, out_size) for m in masks], 1)
    shares = _split_by_norms(bias_relevance, norms)  # (N, Kp, K, Ho, Wo)
    pooled_size = (pool.pooled.shape[-2], pool.pooled.shape[-1])
    per_offset = torch.stack(
        [fold_taps(shares[:, o], source, pooled_size) for o in range(len(masks))], 1
    )
    return fold_pool_offsets(per_offset, pool)


def unit_backward(unit: Unit, relevance: Tensor) -> list[tuple[str, Tensor]]:
    """Relevance each source of ``unit`` passes to its slot, given the unit's output relevance
    ``(N, Ho, Wo)``. The parts sum to ``relevance.sum()`` wherever :math:`\\hat v \\neq 0`."""
    rho = ratio_scale(unit.preact, relevance)
    cotangent = unit.preact * rho[:, None]
    out = []
    for source in unit.sources:
        r_in = gradient_times_input(source, cotangent)
        if source.shift is not None:
            b = rho * torch.einsum("nchw,c->nhw", unit.preact, source.shift)
            r_in = r_in + bias_term(source, b, (r_in.shape[-2], r_in.shape[-1]))
        out.append((source.slot, r_in))
    return out
