"""First-principal-component projection (Eigen-CAM and ``eigen_smooth``), batched in torch."""

from __future__ import annotations

import torch
from torch import Tensor


def first_component_projection(contributions: Tensor) -> Tensor:
    r"""Project each position's channel vector on the first principal component.

    For image ``n`` with :math:`X \in \mathbb{R}^{hw \times C}` (channels as columns, centred per
    channel), returns :math:`X v_1` reshaped to ``(h, w)``, where :math:`v_1` is the first right
    singular vector. The sign of :math:`v_1` is arbitrary in an SVD; fastxai fixes it so that the
    largest-magnitude value of the projection is positive (pytorch-grad-cam leaves it to LAPACK).
    ``(N, C, h, w) -> (N, h, w)``; NaN entries count as 0.
    """
    n, c, h, w = contributions.shape
    data = torch.nan_to_num(contributions.double(), nan=0.0).flatten(2).transpose(1, 2)
    centred = data - data.mean(1, keepdim=True)
    if n == 0 or c == 0 or h * w == 0:
        return contributions.new_zeros((n, h, w))
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = (centred @ vh[:, 0, :, None])[..., 0]
    return positive_peak(projection).view(n, h, w).to(contributions.dtype)


def positive_peak(projection: Tensor) -> Tensor:
    """``(N, P)`` projections, each negated where its largest-magnitude value is negative: the
    sign convention for eigenvectors, whose sign is otherwise arbitrary."""
    peak = projection.gather(1, projection.abs().argmax(1, keepdim=True))
    return torch.where(peak < 0, -projection, projection)
