"""The linear infill of ROAD (Rong et al., 2022, Sec. 4): each missing pixel is the weighted mean
of its eight neighbours, solved for all missing pixels at once with conjugate gradients in torch.

For missing pixel :math:`i` with in-image neighbours :math:`j` (weights :math:`w_j` 1/6 for edge
and 1/12 for diagonal neighbours) the equation is
:math:`(\\sum_j w_j) x_i - \\sum_{j \\text{ missing}} w_j x_j = \\sum_{j \\text{ known}} w_j v_j`.
Its matrix is symmetric (the weights are symmetric in the offset) and positive definite whenever
some pixel is known (a weighted graph Laplacian with a Dirichlet boundary), so conjugate
gradients converge; every channel of every image is one system, solved together.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Relative residual at which a system counts as solved, in float64: the solution is then exact
# far below float32 rounding, the precision pytorch-grad-cam returns it in.
RELATIVE_RESIDUAL = 1e-12
_CHECK_EVERY = 8


def neighbour_sum(t: Tensor) -> Tensor:
    """:math:`\\sum_j w_j t_j` over the in-image neighbours of every pixel of ``(..., H, W)``.

    The weights are :math:`(u u^\\top - 4 e_{11}) / 12` with :math:`u = (1, 2, 1)`, so the sum is
    one separable pass of :math:`u` per axis on the zero-padded grid, less the centre.
    """
    padded = F.pad(t, (1, 1, 1, 1))
    # in-place adds: arithmetic producing a new tensor from a strided view is several times slower
    rows = torch.add(padded[..., :-2, :], padded[..., 2:, :]).add_(padded[..., 1:-1, :], alpha=2)
    both = torch.add(rows[..., :-2], rows[..., 2:]).add_(rows[..., 1:-1], alpha=2)
    return both.sub_(t, alpha=4).div_(12)


def linear_infill(images: Tensor, known: Tensor) -> Tensor:
    """``images`` ``(B, C, H, W)`` with the pixels where ``known`` ``(B, H, W)`` is False replaced
    by the solution of the neighbour equations, in float64. An image with no known pixel has no
    unique solution; its pixels become 0 (as pytorch-grad-cam's sparse solver returns there)."""
    h, w = images.shape[-2:]
    values = images.double()
    missing = (~known.bool())[:, None].double()
    degree = neighbour_sum(torch.ones((h, w), dtype=torch.float64, device=images.device))
    rhs = missing * neighbour_sum((1 - missing) * values)

    def system(u: Tensor) -> Tensor:
        return missing * (degree * u - neighbour_sum(u))

    solution = _conjugate_gradients(system, rhs, degree, max_iterations=h * w)
    return torch.where(missing.bool(), solution, values)


def _conjugate_gradients(
    system: Callable[[Tensor], Tensor], rhs: Tensor, diagonal: Tensor, max_iterations: int
) -> Tensor:
    """Jacobi-preconditioned conjugate gradients for every ``(B, C)`` system at once."""
    u = torch.zeros_like(rhs)
    r = rhs.clone()
    z = r / diagonal
    p = z.clone()
    rz = (r * z).sum((2, 3), keepdim=True)
    tiny = torch.finfo(rhs.dtype).tiny
    target = RELATIVE_RESIDUAL * rhs.flatten(2).norm(dim=2)
    for iteration in range(max_iterations):
        # checked every few iterations: each check waits for the device
        if iteration % _CHECK_EVERY == 0 and (r.flatten(2).norm(dim=2) <= target).all():
            break
        q = system(p)
        pq = (p * q).sum((2, 3), keepdim=True)
        alpha = torch.where(pq > 0, rz / pq.clamp_min(tiny), 0.0)
        u.addcmul_(alpha, p)
        r.addcmul_(alpha, q, value=-1)
        z = r / diagonal
        rz_next = (r * z).sum((2, 3), keepdim=True)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(tiny), 0.0)
        p = z.addcmul_(beta, p)
        rz = rz_next
    return u
