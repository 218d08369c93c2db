"""pytorch-grad-cam's ``utils.image`` helpers in NumPy and PyTorch (no OpenCV).

Same names, arguments and outputs as pytorch-grad-cam 1.5.7. Where it calls OpenCV, fastxai
computes the same thing itself: the JET colour table of ``cv2.applyColorMap`` as a formula, and
``cv2.resize`` (bilinear, half-pixel centres) through :func:`torch.nn.functional.interpolate`.
:func:`show_factorization_on_image` and :func:`create_labels_legend` (Deep Feature
Factorization's pictures) are in :mod:`.factorization_image`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F

from fastxai.compat.utils.factorization_image import (
    create_labels_legend,
    show_factorization_on_image,
)

COLORMAP_JET = 2  # OpenCV's constant for its JET colour map, pytorch-grad-cam's default


def _jet_table() -> np.ndarray:
    r"""OpenCV's JET colour map as a ``(256, 3)`` uint8 RGB table.

    Each channel is a trapezoid rising and falling by 4 levels per step, clipped to [0, 255] and
    rounded half to even: with :math:`i` the grey level,
    :math:`R = \min(4(i - 96) + 1.5,\ 4(255 - i) + 127.5)`,
    :math:`G = \min(4(i - 33) + 3.5,\ 4(223 - i) + 0.5)`,
    :math:`B = \min(4i + 127.5,\ 4(159 - i) + 1.5)`.
    """
    i = np.arange(256.0)
    red = np.minimum(4 * (i - 96) + 1.5, 4 * (255 - i) + 127.5)
    green = np.minimum(4 * (i - 33) + 3.5, 4 * (223 - i) + 0.5)
    blue = np.minimum(4 * i + 127.5, 4 * (159 - i) + 1.5)
    return np.rint(np.clip(np.stack([red, green, blue], 1), 0, 255)).astype(np.uint8)


_JET_RGB = _jet_table()


def _colour_table(colormap: Any) -> np.ndarray:
    """``(256, 3)`` uint8 RGB table of ``colormap``: OpenCV's JET constant or a matplotlib map."""
    if isinstance(colormap, (int, np.integer)) and not isinstance(colormap, bool):
        if colormap != COLORMAP_JET:
            raise ValueError(
                f"colormap: only OpenCV's COLORMAP_JET ({COLORMAP_JET}) is built in, got "
                f"{colormap}; pass a matplotlib colormap name or object for other maps"
            )
        return _JET_RGB
    try:
        cmap = matplotlib.colormaps[colormap] if isinstance(colormap, str) else colormap
        rgb = np.asarray(cmap(np.arange(256) / 255.0))[:, :3]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"colormap: expected COLORMAP_JET or a matplotlib colormap name/object, got "
            f"{colormap!r}"
        ) from exc
    return np.rint(rgb * 255).astype(np.uint8)


def show_cam_on_image(
    img: np.ndarray,
    mask: np.ndarray,
    use_rgb: bool = False,
    colormap: Any = COLORMAP_JET,
    image_weight: float = 0.5,
) -> np.ndarray:
    r"""Overlay the map ``mask`` ``(H, W)`` in [0, 1] on ``img`` ``(H, W, 3)`` in [0, 1].

    :math:`c = (1 - w)\,\mathrm{heat}(\lfloor 255 m \rfloor) / 255 + w\, I`, returned as
    :math:`\lfloor 255\, c / \max c \rfloor` uint8. The heat map is BGR unless ``use_rgb``
    (pytorch-grad-cam's default), so pass ``use_rgb=True`` for an RGB ``img``.
    """
    levels = np.uint8(255 * mask)
    table = _colour_table(colormap)
    heatmap = table[levels] if use_rgb else table[levels][..., ::-1]
    heatmap = np.float32(heatmap) / 255
    if np.max(img) > 1:
        raise ValueError("img: expected a float32 image in the range [0, 1]")
    if image_weight < 0 or image_weight > 1:
        raise ValueError(f"image_weight: expected a value in [0, 1], got {image_weight}")
    cam = (1 - image_weight) * heatmap + image_weight * img
    cam = cam / np.max(cam)
    return np.uint8(255 * cam)


def preprocess_image(
    img: np.ndarray,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> torch.Tensor:
    r"""``(H, W, C)`` image -> ``(1, C, H, W)`` tensor :math:`(x - \mu) / \sigma`.

    A uint8 image is first divided by 255 (as ``torchvision.transforms.ToTensor``); a float
    image keeps its values and dtype.
    """
    array = np.asarray(img)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"img: expected an (H, W, C) or (H, W) array, got shape {array.shape}")
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    if tensor.dtype == torch.uint8:
        tensor = tensor.to(torch.get_default_dtype()).div(255)
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype)[:, None, None]
    std_t = torch.as_tensor(std, dtype=tensor.dtype)[:, None, None]
    return ((tensor - mean_t) / std_t).unsqueeze(0)


def deprocess_image(img: np.ndarray) -> np.ndarray:
    r"""An image-like array to uint8 for display: :math:`\mathrm{clip}(0.1 (x - \bar x) /
    (\mathrm{std}(x) + 10^{-5}) + 0.5,\ 0, 1) \cdot 255`, truncated."""
    img = img - np.mean(img)
    img = img / (np.std(img) + 1e-5)
    img = img * 0.1 + 0.5
    return np.uint8(np.clip(img, 0, 1) * 255)


def _resize_bilinear(img: np.ndarray, target_size: Sequence[int]) -> np.ndarray:
    """``img`` ``(h, w)`` float32 resized to ``target_size`` = (width, height), bilinear with
    half-pixel centres and no anti-aliasing (``cv2.resize``'s default)."""
    width, height = int(target_size[0]), int(target_size[1])
    t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    up = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    return up[0, 0].numpy()


def scale_cam_image(cam: Any, target_size: Sequence[int] | None = None) -> np.ndarray:
    r"""Min-max each map :math:`(z - \min z) / (\max(z - \min z) + 10^{-7})`, then, if
    ``target_size`` = (width, height) is given, resize it bilinearly. Returns float32 ``(N, ...)``.

    Maps with more than two dimensions (volumes) are not resized: pytorch-grad-cam uses a cubic
    spline there (``scipy.ndimage.zoom``), which fastxai does not depend on.
    """
    result = []
    for img in cam:
        img = img - np.min(img)
        img = img / (1e-7 + np.max(img))
        if target_size is not None:
            if img.ndim != 2:
                raise ValueError(
                    f"cam: resizing needs 2-D maps (N, h, w), got maps of shape {img.shape}"
                )
            img = _resize_bilinear(np.float32(img), target_size)
        result.append(img)
    return np.float32(result)


def scale_accross_batch_and_channels(tensor: Any, target_size: Sequence[int]) -> np.ndarray:
    """:func:`scale_cam_image` on every map of ``(N, C, h, w)``, returned as ``(N, C, H, W)``
    with ``target_size`` = (W, H). (The spelling is pytorch-grad-cam's.)"""
    batch_size, channel_size = tensor.shape[:2]
    flat = tensor.reshape(batch_size * channel_size, *tensor.shape[2:])
    scaled = scale_cam_image(flat, target_size)
    return scaled.reshape(batch_size, channel_size, target_size[1], target_size[0])


__all__ = [
    "COLORMAP_JET",
    "create_labels_legend",
    "deprocess_image",
    "preprocess_image",
    "scale_accross_batch_and_channels",
    "scale_cam_image",
    "show_cam_on_image",
    "show_factorization_on_image",
]
