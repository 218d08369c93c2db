"""pytorch-grad-cam's ``utils.svd_on_activations``: activations projected on their first
principal component, in NumPy, for code that calls these helpers itself.

For each ``(C, H, W)`` activation the ``H * W`` pixels are points in ``C`` dimensions; after
centring them (NaN read as 0), each pixel's value is its coordinate along the first right
singular vector of ``np.linalg.svd``, whose sign LAPACK leaves arbitrary. fastxai's own
Eigen-CAM (:func:`fastxai.eigencam`) computes the same projection in torch on the input's device
and fixes the sign; these helpers return exactly what pytorch-grad-cam's return.
"""

from __future__ import annotations

import numpy as np


def _centred_pixels(activations: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` -> ``(H * W, C)`` pixels minus their mean, NaN read as 0."""
    pixels = np.nan_to_num(activations, nan=0.0, posinf=np.inf, neginf=-np.inf)
    pixels = pixels.reshape(pixels.shape[0], -1).T
    return pixels - pixels.mean(axis=0)


def _first_component(activations: np.ndarray) -> np.ndarray:
    """``(H, W)``: each centred pixel's coordinate along the first right singular vector."""
    pixels = _centred_pixels(activations)
    # full_matrices=True: the same LAPACK call, hence the same sign, as pytorch-grad-cam
    _, _, right = np.linalg.svd(pixels, full_matrices=True)
    return (pixels @ right[0, :]).reshape(activations.shape[1:])


def _check_batch(activation_batch: np.ndarray) -> np.ndarray:
    batch = np.asarray(activation_batch)
    if batch.ndim != 4:
        raise ValueError(
            f"activation_batch: expected a (N, C, H, W) array, got shape {batch.shape}"
        )
    return batch


def get_2d_projection(activation_batch: np.ndarray) -> np.ndarray:
    """``(N, C, H, W)`` activations -> ``(N, H, W)`` float32 projections on each image's first
    principal component (its sign as the SVD returns it)."""
    batch = _check_batch(activation_batch)
    return np.asarray([_first_component(a) for a in batch], dtype=np.float32)


def get_2d_projection_with_sign_correction(activation_batch: np.ndarray) -> np.ndarray:
    """:func:`get_2d_projection` with each projection negated where its most negative value is
    larger in magnitude than its largest (Seg-Eigen-CAM, Chung and Ying, Appl. Sci. 2025,
    Eq. 13)."""
    batch = _check_batch(activation_batch)
    projections = []
    for activations in batch:
        projection = _first_component(activations)
        if abs(projection.min()) > abs(projection.max()):
            projection = -projection
        projections.append(projection)
    return np.asarray(projections, dtype=np.float32)


def get_2d_projection_kernel(
    activation_batch: np.ndarray, kernel: str = "sigmoid", gamma: float | None = None
) -> np.ndarray:
    """``(N, H, W)`` float32: each image's centred pixels on the first component of
    scikit-learn's ``KernelPCA(n_components=1, kernel=kernel, gamma=gamma)`` (needs
    scikit-learn; fastxai's KPCA-CAM computes its kernel PCA in torch)."""
    try:
        from sklearn.decomposition import KernelPCA
    except ImportError as exc:
        raise ImportError(
            "get_2d_projection_kernel needs scikit-learn: pip install scikit-learn"
        ) from exc
    batch = _check_batch(activation_batch)
    projections = []
    for activations in batch:
        pca = KernelPCA(n_components=1, kernel=kernel, gamma=gamma)
        component = pca.fit_transform(_centred_pixels(activations))
        projections.append(component.reshape(activations.shape[1:]))
    return np.asarray(projections, dtype=np.float32)
