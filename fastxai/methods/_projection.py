"""First-principal-component projection (Eigen-CAM and ``eigen_smooth``), batched in torch."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

SvdSign = Literal["largest_positive", "numpy"]
SVD_SIGNS = ("largest_positive", "numpy")


def check_svd_sign(svd_sign: object) -> None:
    if svd_sign not in SVD_SIGNS:
        raise ValueError(f"svd_sign must be one of {list(SVD_SIGNS)}, got {svd_sign!r}")


def first_component_projection(
    contributions: Tensor, svd_sign: SvdSign = "largest_positive"
) -> Tensor:
    r"""Project each position's channel vector on the first principal component.

    For image ``n`` with :math:`X \in \mathbb{R}^{hw \times C}` (channels as columns, centred per
    channel), returns :math:`X v_1` reshaped to ``(h, w)``, where :math:`v_1` is the first right
    singular vector. The sign of :math:`v_1` is arbitrary in an SVD. ``svd_sign`` fixes it:
    ``"largest_positive"`` makes the largest-magnitude value of the projection positive;
    ``"numpy"`` takes the sign that ``numpy.linalg.svd`` gives for :math:`X` in float32, as
    pytorch-grad-cam computes it (its maps then equal pytorch-grad-cam's; the projection itself
    is still computed in float64). ``(N, C, h, w) -> (N, h, w)``; NaN entries count as 0.
    """
    check_svd_sign(svd_sign)
    n, c, h, w = contributions.shape
    data = torch.nan_to_num(contributions.double(), nan=0.0).flatten(2).transpose(1, 2)
    centred = data - data.mean(1, keepdim=True)
    if n == 0 or c == 0 or h * w == 0:
        return contributions.new_zeros((n, h, w))
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = (centred @ vh[:, 0, :, None])[..., 0]
    if svd_sign == "numpy":
        projection = projection * numpy_svd_sign(contributions, vh[:, 0])[:, None]
    else:
        projection = positive_peak(projection)
    return projection.view(n, h, w).to(contributions.dtype)


def numpy_svd_sign(contributions: Tensor, first_vectors: Tensor) -> Tensor:
    """``(N,)`` +-1: the sign that turns each of ``first_vectors`` ``(N, C)`` into the first
    right singular vector that ``numpy.linalg.svd`` (LAPACK's gesdd, full matrices) finds for
    centred ``(hw, C)`` matrix of that image in float32 (float64 for a float64 model), as
    pytorch-grad-cam builds it."""
    dtype = torch.float64 if contributions.dtype == torch.float64 else torch.float32
    signs = []
    images = contributions.detach().to(dtype).cpu().numpy()
    for image, vector in zip(images, first_vectors, strict=True):
        rows = image.reshape(image.shape[0], -1).T
        rows = np.nan_to_num(rows, nan=0.0)
        rows = rows - rows.mean(axis=0)
        _, _, vt = np.linalg.svd(rows, full_matrices=True)
        agreement = float(np.dot(vt[0].astype(np.float64), vector.cpu().numpy()))
        signs.append(-1.0 if agreement < 0 else 1.0)
    return torch.tensor(signs, dtype=first_vectors.dtype, device=first_vectors.device)


def positive_peak(projection: Tensor) -> Tensor:
    """``(N, P)`` projections, each negated where its largest-magnitude value is negative: the
    sign convention for eigenvectors, whose sign is otherwise arbitrary."""
    peak = projection.gather(1, projection.abs().argmax(1, keepdim=True))
    return torch.where(peak < 0, -projection, projection)
