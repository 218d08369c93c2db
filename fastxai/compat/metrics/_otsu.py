"""Otsu's threshold of an 8-bit image (Otsu, 1979), as OpenCV's ``THRESH_OTSU`` computes it."""

from __future__ import annotations

import numpy as np

# OpenCV skips a split whose class probabilities are within float32's epsilon of 0 or 1.
_EPSILON = float(np.finfo(np.float32).eps)


def otsu_threshold(image: np.ndarray) -> int:
    r"""The level :math:`t` maximising the between-class variance
    :math:`q_1 q_2 (\mu_1 - \mu_2)^2` of the pixels :math:`\le t` and :math:`> t` (the first
    maximum; 0 when no split has two non-empty classes)."""
    histogram = np.bincount(np.asarray(image, dtype=np.uint8).ravel(), minlength=256)
    scale = 1.0 / max(histogram.sum(), 1)
    mean = float((np.arange(256) * histogram).sum()) * scale
    best, best_level = 0.0, 0
    mean_low = weight_low = 0.0
    # The running update follows OpenCV's order of operations, so ties resolve as there.
    for level in range(256):
        p = histogram[level] * scale
        mean_low *= weight_low
        weight_low += p
        weight_high = 1.0 - weight_low
        if min(weight_low, weight_high) < _EPSILON or max(weight_low, weight_high) > 1 - _EPSILON:
            continue
        mean_low = (mean_low + level * p) / weight_low
        mean_high = (mean - weight_low * mean_low) / weight_high
        gap = mean_low - mean_high
        variance = weight_low * weight_high * gap * gap
        if variance > best:
            best, best_level = variance, level
    return best_level


def otsu_foreground(image: np.ndarray) -> np.ndarray:
    """``image > otsu_threshold(image)`` as uint8 0 / 255 (``cv2.THRESH_BINARY``)."""
    image = np.asarray(image, dtype=np.uint8)
    return np.where(image > otsu_threshold(image), 255, 0).astype(np.uint8)
