"""OpenCV's 8-bit RGB <-> HSV conversions (hue in [0, 180)) in NumPy.

``rgb_to_hsv`` is OpenCV's integer algorithm: 12-bit fixed-point divisions by tables of
:math:`255 \\cdot 2^{12} / v` and :math:`30 \\cdot 2^{12} / \\Delta`, rounded. ``hsv_to_rgb`` is
OpenCV 5's float32 path: :math:`s` and :math:`v` scaled by ``float32(1/255)``, the hue's sector
and fraction, :math:`1 - s f` and :math:`1 - s (1 - f)` each rounded once (fused multiply-add),
and the channels truncated after multiplying by 255 (OpenCV 4 rounds there, so it can be one
level higher). Both equal ``cv2.cvtColor`` on every 8-bit input.
"""

from __future__ import annotations

import numpy as np

_SHIFT = 12
_LEVELS = np.arange(256)
# OpenCV's division tables; entry 0 is never used as a divisor (it multiplies a zero)
_SATURATION_DIVISOR = np.rint((255 << _SHIFT) / np.maximum(_LEVELS, 1)).astype(np.int64)
_HUE_DIVISOR = np.rint((180 << _SHIFT) / (6.0 * np.maximum(_LEVELS, 1))).astype(np.int64)
_SATURATION_DIVISOR[0] = _HUE_DIVISOR[0] = 0

# for each sixth of the hue circle, which of (v, p, q, t) is red, green and blue
_SECTOR_CHANNELS = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def _fixed_point(value: np.ndarray) -> np.ndarray:
    return (value + (1 << (_SHIFT - 1))) >> _SHIFT


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``(..., 3)`` RGB -> uint8 HSV, hue in [0, 180), as ``cv2.COLOR_RGB2HSV``."""
    rgb = np.asarray(rgb).astype(np.int64)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(-1)
    spread = value - rgb.min(-1)
    saturation = _fixed_point(spread * _SATURATION_DIVISOR[value])
    hue = np.where(
        value == red,
        green - blue,
        np.where(value == green, blue - red + 2 * spread, red - green + 4 * spread),
    )
    hue = _fixed_point(hue * _HUE_DIVISOR[spread])  # >> floors negatives, as in C
    hue = np.where(hue < 0, hue + 180, hue)
    return np.stack([np.clip(hue, 0, 255), saturation, value], -1).astype(np.uint8)


def _one_minus_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 :math:`1 - ab` rounded once (a fused multiply-add): the float32 product is exact
    in float64."""
    return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 ``(..., 3)`` HSV, hue in [0, 180) -> uint8 RGB, as OpenCV 5's
    ``cv2.COLOR_HSV2RGB``."""
    hsv = np.asarray(hsv)
    f32 = np.float32
    scale = f32(1 / 255)
    hue = np.fmod(hsv[..., 0].astype(f32) * f32(6 / 180), f32(6))
    saturation = hsv[..., 1].astype(f32) * scale
    value = hsv[..., 2].astype(f32) * scale
    sector = np.floor(hue).astype(np.int64)
    fraction = (hue - sector).astype(f32)
    p = value * (f32(1) - saturation)
    q = value * _one_minus_product(saturation, fraction)
    t = value * _one_minus_product(saturation, (f32(1) - fraction).astype(f32))
    table = np.stack([value, p, q, t], -1)
    rgb = np.take_along_axis(table, _SECTOR_CHANNELS[sector], -1)
    rgb = np.where((saturation == 0)[..., None], value[..., None], rgb)
    return np.clip(np.trunc(rgb * f32(255)), 0, 255).astype(np.uint8)
