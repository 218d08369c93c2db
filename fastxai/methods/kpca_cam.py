"""KPCA-CAM (Karmani et al., 2024): Eigen-CAM with kernel PCA in place of PCA."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastxai.capture import LayerCapture
from fastxai.methods._base import make_cam_method
from fastxai.methods._projection import positive_peak

KERNELS = ("linear", "poly", "rbf", "sigmoid", "cosine")


def kernel_matrix(data: Tensor, kernel: str, gamma: float, degree: int, coef0: float) -> Tensor:
    r"""Pairwise kernel of the rows of ``data`` ``(N, P, C)`` -> ``(N, P, P)``.

    linear :math:`x^\top y`; poly :math:`(\gamma x^\top y + c_0)^d`; rbf
    :math:`e^{-\gamma \|x - y\|^2}`; sigmoid :math:`\tanh(\gamma x^\top y + c_0)`; cosine
    :math:`x^\top y / (\|x\| \|y\|)` (0 for a zero row).
    """
    if kernel == "linear":
        return data @ data.transpose(1, 2)
    if kernel == "poly":
        return (gamma * (data @ data.transpose(1, 2)) + coef0) ** degree
    if kernel == "sigmoid":
        return torch.tanh(gamma * (data @ data.transpose(1, 2)) + coef0)
    if kernel == "cosine":
        norms = data.norm(dim=2, keepdim=True)
        unit = data / torch.where(norms == 0, torch.ones_like(norms), norms)
        return unit @ unit.transpose(1, 2)
    return torch.exp(-gamma * torch.cdist(data, data).square())  # rbf


def kernel_first_component(
    activation: Tensor,
    kernel: str = "sigmoid",
    gamma: float | None = None,
    degree: int = 3,
    coef0: float = 1.0,
) -> Tensor:
    r"""Each position's score on the first kernel principal component, ``(N, C, h, w) ->
    (N, h, w)``.

    With :math:`X \in \mathbb{R}^{hw \times C}` centred per channel and :math:`K` its kernel
    matrix, double-centred :math:`\tilde K = K - \mathbf{1}K - K\mathbf{1} + \mathbf{1}K\mathbf{1}`
    (:math:`\mathbf{1}` the matrix of :math:`1/hw`): the scores are :math:`\sqrt{\lambda_1}\,
    v_1`, the top eigenpair of :math:`\tilde K` (scikit-learn's ``KernelPCA(n_components=1)
    .fit_transform``). ``gamma`` defaults to :math:`1/C`. The eigenvector's sign is fixed so
    that its largest-magnitude entry is positive. Computed in float64; NaN entries count as 0.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {list(KERNELS)}, got {kernel!r}")
    n, c, h, w = activation.shape
    if n == 0 or h * w == 0:
        return activation.new_zeros((n, h, w))
    data = torch.nan_to_num(activation.double(), nan=0.0).flatten(2).transpose(1, 2)
    data = data - data.mean(1, keepdim=True)
    k = kernel_matrix(data, kernel, 1.0 / c if gamma is None else gamma, degree, coef0)
    k = k - k.mean(1, keepdim=True) - k.mean(2, keepdim=True) + k.mean((1, 2), keepdim=True)
    values, vectors = torch.linalg.eigh(k)
    top = positive_peak(vectors[:, :, -1]) * values[:, -1:].clamp_min(0).sqrt()
    return top.view(n, h, w).to(activation.dtype)


def kpcacam_contributions(
    cap: LayerCapture,
    model: nn.Module,
    x: Tensor,
    kernel: str = "sigmoid",
    gamma: float | None = None,
) -> tuple[Tensor, None]:
    """The first kernel principal component's scores, as a single pseudo-channel."""
    return kernel_first_component(cap.activation, kernel, gamma)[:, None], None


kpcacam = make_cam_method(
    "kpcacam",
    kpcacam_contributions,
    with_gradient=False,
    differentiable=False,
    summary=r"""KPCA-CAM: each position's score on the first kernel principal component of the
    layer's activations (class-agnostic: ``targets`` only choose what ``Explanation.targets``
    reports), then ReLU, min-max, bilinear upsampling, min-max. ``kernel=`` one of ``"sigmoid"``
    (default), ``"rbf"``, ``"poly"`` (degree 3), ``"linear"`` or ``"cosine"``, with ``coef0``
    1; ``gamma=`` defaults to 1 / channels. See
    :func:`~fastxai.methods.kpca_cam.kernel_first_component`.""",
)
