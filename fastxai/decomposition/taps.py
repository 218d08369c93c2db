"""Per-tap geometry of a convolution: the norm pass and the scatter back to input positions.

For output position ``q`` and tap ``k = (i, j)`` the input position is
``p = stride * q + dilation * k - padding``; taps on the zero padding contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastxai.decomposition.trace import LinearSource, Pair, PoolRouting

# Largest intermediate (elements) the norm pass materialises at once; taps are chunked beyond it.
_CHUNK_ELEMENTS = 1 << 24


def _norms_same_input(v: Tensor, weight: Tensor, groups: int) -> Tensor:
    r""":math:`\|W_k v_p\|` over output channels for every tap ``k`` of ``weight`` and position
    ``p`` of ``v``: ``(N, K, H, W)`` from ``v`` ``(N, C_in, H, W)`` and ``weight``
    ``(C_out, C_in / groups, kh, kw)``.

    With fewer input than output channels (and one group) the quadratic form
    :math:`v^\top (W_k^\top W_k) v` is cheaper than forming :math:`W_k v`.
    """
    n, c_in, height, width = v.shape
    c_out, c_in_group, kh, kw = weight.shape
    taps = kh * kw
    per_tap = weight.permute(2, 3, 0, 1).reshape(taps, c_out, c_in_group)
    if groups == 1 and c_in < c_out:
        gram = per_tap.transpose(1, 2) @ per_tap  # (K, C_in, C_in)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, n * c_in * height * width))
        out = []
        for start in range(0, taps, chunk):
            g = gram[start : start + chunk]
            z = F.conv2d(v, g.reshape(-1, c_in, 1, 1)).view(n, g.shape[0], c_in, height, width)
            out.append(torch.einsum("nkchw,nchw->nkhw", z, v))
        return torch.cat(out, 1).clamp_min(0).sqrt()
    c_out_group = c_out // groups
    # (groups, K, C_out/groups, C_in/groups): outputs of one group stay inside that group
    grouped = per_tap.view(taps, groups, c_out_group, c_in_group).transpose(0, 1)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n * c_out * height * width))
    out = []
    for start in range(0, taps, chunk):
        w = grouped[:, start : start + chunk]
        k = w.shape[1]
        y = F.conv2d(v, w.reshape(-1, c_in_group, 1, 1), groups=groups)
        if groups == 1:
            out.append(torch.linalg.vector_norm(y.view(n, k, c_out, height, width), dim=2))
        else:
            y = y.view(n, groups, k, c_out_group, height, width)
            out.append(y.square().sum((1, 3)).sqrt())
    return torch.cat(out, 1)


def tap_norms(source: LinearSource, inputs: Tensor, out_size: Pair) -> Tensor:
    r"""``(N, K, Ho, Wo)``: :math:`n_k(q) = \|W'_k v_{p(q,k)}\|`, 0 for taps on the padding.

    With stride 1 every (tap, input position) pair is used, so the norms are formed once per
    input position in one GEMM and then read per tap; with a larger stride only the strided
    input positions of each tap are formed.
    """
    assert source.weight is not None
    weight = source.weight
    kh, kw = weight.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = source.stride, source.padding, source.dilation
    ho, wo = out_size
    rows = [(i * dh, j * dw) for i in range(kh) for j in range(kw)]
    if (sh, sw) == (1, 1) and kh * kw > 1:
        # zero padding has zero norm: pad the K-channel norm map, not the C_in-channel input
        norms = F.pad(_norms_same_input(inputs, weight, source.groups), (pw, pw, ph, ph))
        return torch.stack(
            [norms[:, k, r : r + ho, c : c + wo] for k, (r, c) in enumerate(rows)], 1
        )
    padded = F.pad(inputs, (pw, pw, ph, ph))
    per_tap = []
    for k, (r, c) in enumerate(rows):
        sub = padded[:, :, r : r + sh * (ho - 1) + 1 : sh, c : c + sw * (wo - 1) + 1 : sw]
        i, j = divmod(k, kw)
        per_tap.append(_norms_same_input(sub, weight[:, :, i : i + 1, j : j + 1], source.groups))
    return torch.cat(per_tap, 1)


def fold_taps(per_tap: Tensor, source: LinearSource, input_size: Pair) -> Tensor:
    """Sum ``(N, K, Ho, Wo)`` values onto the input grid ``(N, H, W)`` at ``p(q, k)``."""
    assert source.weight is not None
    n = per_tap.shape[0]
    folded = F.fold(
        per_tap.reshape(n, per_tap.shape[1], -1),
        output_size=input_size,
        kernel_size=tuple(source.weight.shape[-2:]),
        dilation=source.dilation,
        padding=source.padding,
        stride=source.stride,
    )
    return folded[:, 0]


def pool_offset_masks(pool: PoolRouting) -> list[Tensor]:
    """One ``(N, C, Hu, Wu)`` bool mask per pool-window offset: the elements whose arg-max lies
    at that offset of their window. The masks partition every pooled element."""
    hu, wu = pool.pooled.shape[-2:]
    width = pool.input_size[1]
    device = pool.indices.device
    row, col = pool.indices // width, pool.indices % width
    base_r = torch.arange(hu, device=device)[:, None] * pool.stride[0] - pool.padding[0]
    base_c = torch.arange(wu, device=device)[None, :] * pool.stride[1] - pool.padding[1]
    offset_r, offset_c = row - base_r, col - base_c
    masks = []
    for a in range(pool.kernel_size[0]):
        for b in range(pool.kernel_size[1]):
            masks.append((offset_r == a * pool.dilation[0]) & (offset_c == b * pool.dilation[1]))
    return masks


def fold_pool_offsets(per_offset: Tensor, pool: PoolRouting) -> Tensor:
    """Sum ``(N, Kp, Hu, Wu)`` values (one channel per window offset) onto the pool's input."""
    n = per_offset.shape[0]
    folded = F.fold(
        per_offset.reshape(n, per_offset.shape[1], -1),
        output_size=pool.input_size,
        kernel_size=pool.kernel_size,
        dilation=pool.dilation,
        padding=pool.padding,
        stride=pool.stride,
    )
    return folded[:, 0]


def route_through_pool(per_element: Tensor, pool: PoolRouting) -> Tensor:
    """Sum ``(N, C, Hu, Wu)`` values over channels onto each element's arg-max: ``(N, H, W)``."""
    n = per_element.shape[0]
    height, width = pool.input_size
    out = per_element.new_zeros(n, height * width)
    out.scatter_add_(1, pool.indices.reshape(n, -1), per_element.reshape(n, -1))
    return out.view(n, height, width)
