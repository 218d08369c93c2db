"""Drawing explanation maps: colour overlays and atomic PNG files (matplotlib + Pillow, no cv2)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image must be a uint8 (H, W, 3) array, got {image.dtype} {tuple(image.shape)}"
        )


def colorize(saliency: Any, colormap: str = "jet") -> np.ndarray:
    """``(H, W)`` values in [0, 1] (clipped) -> ``(H, W, 3)`` float RGB in [0, 1]."""
    import matplotlib

    values = np.clip(np.asarray(saliency, dtype=np.float64), 0.0, 1.0)
    return matplotlib.colormaps[colormap](values)[..., :3]


def overlay(image: Any, saliency: Any, alpha: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """Blend a coloured saliency map onto an image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        saliency: ``(H, W)`` map in [0, 1] (numpy array or CPU tensor; values outside are clipped).
        alpha: weight of the colour: 0 returns ``image``, 1 the colour-mapped saliency.
        colormap: a matplotlib colormap name.

    Returns:
        ``(H, W, 3)`` uint8 ``round((1 - alpha) * image + alpha * 255 * colormap(saliency))``.
    """
    image = np.asarray(image)
    _check_image(image)
    saliency = np.asarray(saliency)
    if saliency.shape != image.shape[:2]:
        raise ValueError(
            f"saliency must have the image's shape {image.shape[:2]}, got {saliency.shape}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    blended = (1.0 - alpha) * image + alpha * 255.0 * colorize(saliency, colormap)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a temporary file next to ``path``, then rename it onto ``path``, so
    readers never see a half-written file. Parent folders are created."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # open(..., "xb") rather than tempfile.mkstemp: the file gets the usual umask-based mode,
    # not mkstemp's 0600.
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temp, "xb") as stream:
            write(stream)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


def save_png(array: Any, path: str | Path) -> Path:
    """Write a uint8 ``(H, W)`` or ``(H, W, 3)`` array as a PNG, atomically; returns the path."""
    pixels = np.asarray(array)
    if pixels.dtype != np.uint8:
        raise ValueError(f"save_png expects a uint8 array, got {pixels.dtype}")
    picture = Image.fromarray(pixels)
    return write_atomically(path, lambda stream: picture.save(stream, format="PNG"))


def side_by_side(
    images: Sequence[Any], titles: Sequence[str], path: str | Path, *, panel_inches: float = 2.5
) -> Path:
    """Save uint8 images in one row with a title above each, as a PNG (atomically)."""
    from matplotlib.figure import Figure

    if len(images) != len(titles):
        raise ValueError(f"got {len(images)} images but {len(titles)} titles")
    if not images:
        raise ValueError("side_by_side needs at least one image")
    figure = Figure(figsize=(panel_inches * len(images), panel_inches + 0.4), layout="tight")
    axes = figure.subplots(1, len(images), squeeze=False)[0]
    for ax, picture, title in zip(axes, images, titles, strict=True):
        ax.imshow(np.asarray(picture))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return write_atomically(path, lambda stream: figure.savefig(stream, format="png", dpi=100))
