"""pytorch-grad-cam's Deep Feature Factorization pictures: :func:`show_factorization_on_image`
and :func:`create_labels_legend`, without OpenCV.

Each concept gets a colour whose HSV value (brightness) follows its map where it is the
strongest concept; the colours are blended with the image and, with labels, a matplotlib legend
is drawn beside it. The HSV round trip is OpenCV's 8-bit one (:mod:`.opencv_hsv`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from fastxai.compat.utils.opencv_hsv import hsv_to_rgb, rgb_to_hsv


def create_labels_legend(
    concept_scores: np.ndarray, labels: Mapping[int, str], top_k: int = 2
) -> list[str]:
    """For each concept (row of ``concept_scores`` ``(k, classes)``), its ``top_k`` classes as
    ``"name:score"`` lines (the first three comma-separated parts of the name, score to 2
    decimals)."""
    scores = np.asarray(concept_scores)
    if scores.ndim != 2:
        raise ValueError(f"concept_scores: expected (concepts, classes), got shape {scores.shape}")
    best = np.argsort(scores, axis=1)[:, ::-1][:, :top_k]
    legend = []
    for row, classes in enumerate(best):
        lines = []
        for category in classes:
            name = ",".join(labels[category].split(",")[:3])
            lines.append(f"{name}:{scores[row, category]:.2f}")
        legend.append("\n".join(lines))
    return legend


def _default_colours(n_components: int) -> list[np.ndarray]:
    """gist_rainbow at 0, 1/k, 2/k, ... (pytorch-grad-cam's and the DFF authors' choice)."""
    cmap = matplotlib.colormaps["gist_rainbow"]
    return [np.array(cmap(i)) for i in np.arange(0, 1, 1.0 / n_components)]


def _concept_colours(explanations: np.ndarray, colours: Sequence[Any]) -> np.ndarray:
    """float32 ``(H, W, 3)``: each pixel in the colour of its strongest concept, with that
    concept's map (as an 8-bit level) as the HSV value."""
    strongest = explanations.argmax(axis=0)
    total = np.zeros((*explanations.shape[1:], 3), np.float32)
    for i, explanation in enumerate(explanations):
        rgb = np.uint8(np.asarray(colours[i], dtype=np.float64)[:3] * 255)
        hsv = np.broadcast_to(rgb_to_hsv(rgb), (*explanation.shape, 3)).copy()
        hsv[..., 2] = np.uint8(255 * np.where(strongest == i, explanation, 0))
        total += np.float32(hsv_to_rgb(hsv)) / 255
    return total


def _resize_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``(h, w, 3)`` resized bilinearly (half-pixel centres, as ``cv2.resize``)."""
    if image.shape[:2] == (height, width):
        return image
    t = torch.from_numpy(image).permute(2, 0, 1)[None].double()
    resized = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _legend_image(
    height: int, width: int, colours: Sequence[Any], concept_labels: Sequence[str]
) -> np.ndarray:
    """The legend of the concepts' colours and labels, drawn by matplotlib as pytorch-grad-cam
    draws it, as uint8 RGB ``(height, width, 3)``; no global matplotlib state is touched."""
    n_components = len(concept_labels)
    dpi = matplotlib.rcParams["figure.dpi"]
    pixel = 1 / dpi
    fig = Figure(figsize=(width * pixel, height * pixel))
    FigureCanvasAgg(fig)
    axes = fig.add_subplot()
    fontsize = int(14 * height / 256 / max(1, n_components / 6))
    line_width = 5 * height / 256
    handles = [Line2D([0], [0], color=colours[i], lw=line_width) for i in range(n_components)]
    axes.legend(
        handles, concept_labels, mode="expand", fancybox=True, shadow=True, fontsize=fontsize
    )
    fig.tight_layout(pad=0, w_pad=0, h_pad=0)
    axes.axis("off")
    fig.canvas.draw()
    drawn = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    return _resize_rgb(drawn, height, width)


def show_factorization_on_image(
    img: np.ndarray,
    explanations: np.ndarray,
    colors: Sequence[Any] | None = None,
    image_weight: float = 0.5,
    concept_labels: Sequence[str] | None = None,
) -> np.ndarray:
    r"""Colour-code the concept maps ``explanations`` ``(k, H, W)`` in [0, 1] on ``img``
    ``(H, W, 3)`` RGB in [0, 1].

    Each pixel takes the colour of its strongest concept (``colors``: ``k`` RGB(A) colours in
    [0, 1], default gist_rainbow) with that concept's map as HSV brightness, and is blended as
    :math:`\lfloor 255\,(w I + (1 - w)\,\mathrm{colour}) \rfloor` uint8. With
    ``concept_labels`` (one string per concept) a legend of the same size is appended on the
    right, giving ``(H, 2W, 3)``. ``explanations`` is not changed (pytorch-grad-cam zeroes each
    map where another concept is stronger, in place).
    """
    explanations = np.asarray(explanations)
    image = np.asarray(img)
    if explanations.ndim != 3:
        raise ValueError(f"explanations: expected (k, H, W) maps, got shape {explanations.shape}")
    if image.ndim != 3 or image.shape[:2] != explanations.shape[1:]:
        raise ValueError(
            f"img: expected (H, W, 3) with (H, W) = {explanations.shape[1:]} (the maps' size), "
            f"got shape {image.shape}"
        )
    n_components = explanations.shape[0]
    colours = _default_colours(n_components) if colors is None else list(colors)
    if len(colours) < n_components:
        raise ValueError(
            f"colors: expected {n_components} colours (one per map), got {len(colours)}"
        )
    if concept_labels is not None and len(concept_labels) != n_components:
        raise ValueError(
            f"concept_labels: expected {n_components} labels (one per map), got "
            f"{len(concept_labels)}"
        )
    mask = _concept_colours(explanations, colours)
    result = np.uint8((image * image_weight + mask * (1 - image_weight)) * 255)
    if concept_labels is None:
        return result
    legend = _legend_image(result.shape[0], result.shape[1], colours, concept_labels)
    return np.hstack((result, legend))


__all__ = ["create_labels_legend", "show_factorization_on_image"]
