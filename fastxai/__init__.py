"""fastxai: faithful and fast CAM-family explanations for PyTorch.

Functional API: ``fastxai.gradcam(model, x, layer, targets=None, *, tft=False)`` and the same for
``cam``, ``gradcampp``, ``xgradcam``, ``layercam``, ``hirescam``, ``eigencam``, ``ablationcam``
and ``scorecam``; each returns an :class:`Explanation` of tensors on ``x``'s device.
pytorch-grad-cam compatible classes live in :mod:`fastxai.compat`.
"""

from fastxai.explanation import Explanation
from fastxai.methods import (
    METHODS,
    ablationcam,
    cam,
    eigencam,
    gradcam,
    gradcampp,
    hirescam,
    layercam,
    scorecam,
    xgradcam,
)
from fastxai.ops import has_extension
from fastxai.thresholding import tft

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Explanation",
    "ablationcam",
    "cam",
    "eigencam",
    "gradcam",
    "gradcampp",
    "has_extension",
    "hirescam",
    "layercam",
    "scorecam",
    "tft",
    "xgradcam",
]
