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


def tft_overlay(
    image: Any,
    saliency: Any,
    mask: Any,
    alpha: float = 0.5,
    colormap: str = "jet",
    muted_brightness: float = 0.3,
) -> np.ndarray:
    """What TFT kept: the :func:`overlay` of ``saliency`` on the kept pixels, and the photo
    darkened to ``muted_brightness`` (no colour) on the muted ones.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        saliency: ``(H, W)`` map in [0, 1] (the thresholded or the original map: equal where kept).
        mask: ``(H, W)`` bool, ``True`` where the pixel is kept (``Explanation.mask``).
        alpha: colour weight on the kept pixels, as in :func:`overlay`.
        colormap: a matplotlib colormap name.
        muted_brightness: factor in [0, 1] applied to the muted pixels of ``image``.
    """
    coloured = overlay(image, saliency, alpha, colormap)
    kept = np.asarray(mask, dtype=bool)
    if kept.shape != coloured.shape[:2]:
        raise ValueError(f"mask must have the image's shape {coloured.shape[:2]}, got {kept.shape}")
    if not 0.0 <= muted_brightness <= 1.0:
        raise ValueError(f"muted_brightness must be in [0, 1], got {muted_brightness}")
    dark = np.rint(np.asarray(image, dtype=np.float64) * muted_brightness).astype(np.uint8)
    return np.where(kept[:, :, None], coloured, dark)


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


def _as_vector(name: str, values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a tensor, possibly on an accelerator
        values = values.detach().double().cpu().numpy()
    vector = np.asarray(values, dtype=np.float64)
    if vector.ndim != 1 or vector.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {vector.shape}")
    return vector


def rpi_plot(
    thresholds: Any,
    rpi: Any,
    tau: float,
    path: str | Path,
    title: str | None = None,
    *,
    xlabel: str = "threshold \u03c4",
) -> Path:
    """Save the relative probability increase versus the threshold as a PNG (atomically).

    Args:
        thresholds: the TFT ladder ``(T,)`` (``Explanation.extras["thresholds"]``).
        rpi: one image's RPI per threshold ``(T,)`` (a row of ``Explanation.rpi``).
        tau: the chosen threshold :math:`\\tau^*`, marked by a dashed vertical line (and a dot
            on the curve when it is one of ``thresholds``).
        path: the PNG file; parent folders are created.
        title: drawn above the plot.
        xlabel: the x-axis label (e.g. "muted fraction" for percentile mode).

    Drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas: no display, no pyplot state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xs, ys = _as_vector("thresholds", thresholds), _as_vector("rpi", rpi)
    if xs.shape != ys.shape:
        raise ValueError(f"thresholds {xs.shape} and rpi {ys.shape} must have the same length")
    tau = float(tau)
    figure = Figure(figsize=(4.5, 3.2), layout="tight")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.plot(xs, ys, marker="o", markersize=3, color="tab:blue", label="RPI")
    label = f"\u03c4* = {tau:g}" + (" (no threshold raised p)" if float(ys.max()) <= 0 else "")
    ax.axvline(tau, color="tab:red", linestyle="--", linewidth=1, label=label)
    hits = np.flatnonzero(np.isclose(xs, tau))
    if hits.size:
        ax.plot(xs[hits[0]], ys[hits[0]], marker="o", markersize=7, color="tab:red")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("RPI (relative probability increase)")
    ax.set_ylim(bottom=0.0, top=max(float(ys.max()) * 1.1, 1e-3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return write_atomically(path, lambda stream: figure.savefig(stream, format="png", dpi=100))
