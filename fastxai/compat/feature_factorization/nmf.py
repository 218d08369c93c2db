"""Non-negative matrix factorisation by coordinate descent, as scikit-learn's
``NMF(init="random", random_state=seed)`` computes it (solver ``"cd"``, Frobenius loss, no
regularisation, ``tol=1e-4``, at most 200 sweeps).

Cichocki and Phan's hierarchical alternating least squares: each column of ``W``, then each of
``H^T``, is moved to its non-negative least-squares optimum with the others fixed. The initial
factors are scikit-learn's: :math:`|\\mathcal{N}(0, 1)| \\sqrt{\\bar X / k}` drawn from
``numpy.random.RandomState(seed)``, ``H`` first. Computed in float64 NumPy on the CPU: the
sweeps are many operations on small vectors, where NumPy's per-call cost is a third of torch's.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _sweep(x: np.ndarray, w: np.ndarray, ht: np.ndarray) -> float:
    """One pass over the columns of ``w`` (``x`` ~ ``w ht^T``), in place; returns the summed
    magnitude of the projected gradient before each update (the convergence measure)."""
    hht = ht.T @ ht
    xht = x @ ht
    violation = 0.0
    for t in range(w.shape[1]):
        grad = w @ hht[:, t] - xht[:, t]
        projected = np.where(w[:, t] == 0, np.minimum(grad, 0.0), grad)
        violation += float(np.abs(projected).sum())
        if hht[t, t] != 0:
            w[:, t] = np.maximum(w[:, t] - grad / hht[t, t], 0.0)
    return violation


def nmf(
    x: Tensor, n_components: int, seed: int = 0, max_iter: int = 200, tol: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """``x`` ``(P, F)`` >= 0 -> ``W`` ``(P, k)`` and ``H`` ``(k, F)``, both >= 0, float64, on
    ``x``'s device."""
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
        raise ValueError(f"n_components must be an int >= 1, got {n_components!r}")
    values = x.detach().to("cpu", torch.float64).numpy()
    if (values < 0).any():
        raise ValueError("x: NMF needs non-negative values")
    samples, features = values.shape
    rng = np.random.RandomState(seed)
    scale = np.sqrt(float(values.mean()) / n_components)
    h = np.abs(scale * rng.standard_normal(size=(n_components, features)))
    w = np.abs(scale * rng.standard_normal(size=(samples, n_components)))
    ht = np.ascontiguousarray(h.T)
    values_t = np.ascontiguousarray(values.T)
    first = None
    for _ in range(max_iter):
        violation = _sweep(values, w, ht) + _sweep(values_t, ht, w)
        first = violation if first is None else first
        if first == 0 or violation / first <= tol:
            break
    return torch.from_numpy(w).to(x.device), torch.from_numpy(ht.T.copy()).to(x.device)
