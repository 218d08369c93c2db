"""fastxai: faithful and fast CAM-family explanations for PyTorch.

Functional API: ``fastxai.gradcam(model, x, layer, targets=None, *, tft=False)`` and the same for
``cam``, ``gradcampp``, ``xgradcam``, ``layercam``, ``hirescam``, ``gradcamelementwise``,
``shapleycam``, ``eigencam``, ``eigengradcam``, ``segeigencam``, ``kpcacam``, ``fem``,
``randomcam``, ``ablationcam`` and ``scorecam``; each returns an :class:`Explanation` of tensors
on ``x``'s device. pytorch-grad-cam compatible classes live in :mod:`fastxai.compat`.

Sharing Ratio Decomposition: ``fastxai.srd(model, x, targets=None, rule="contrastive")``,
``srd_erf``, ``apop`` and ``apop_agreement`` (torchvision ResNets and VGGs). Activation
fine-tuning: :mod:`fastxai.aft`. ``fastxai.activation_matching(model, x)`` finds the smallest
binary mask per image that keeps the prediction (Activation Matching; ``recipe="paper"`` trains
the authors' U-Net). Many images: ``explain_stream`` (batches, progress
bar) and ``explain_dataset`` (resumable shards, torchrun). Atomic, resumable result shards:
:mod:`fastxai.io`.
"""

from fastxai import io, metrics, nn
from fastxai._version import __version__ as __version__
from fastxai.decomposition import apop, apop_agreement, srd, srd_erf
from fastxai.explanation import Explanation
from fastxai.matching import activation_matching
from fastxai.methods import (
    METHODS,
    ablationcam,
    cam,
    eigencam,
    eigengradcam,
    fem,
    gradcam,
    gradcamelementwise,
    gradcampp,
    hirescam,
    kpcacam,
    layercam,
    randomcam,
    scorecam,
    segeigencam,
    shapleycam,
    xgradcam,
)
from fastxai.ops import has_extension
from fastxai.stream import explain_dataset, explain_stream
from fastxai.thresholding import tft

__all__ = [
    "METHODS",
    "Explanation",
    "ablationcam",
    "activation_matching",
    "apop",
    "apop_agreement",
    "cam",
    "eigencam",
    "eigengradcam",
    "explain_dataset",
    "explain_stream",
    "fem",
    "gradcam",
    "gradcamelementwise",
    "gradcampp",
    "has_extension",
    "hirescam",
    "io",
    "kpcacam",
    "layercam",
    "metrics",
    "nn",
    "randomcam",
    "scorecam",
    "segeigencam",
    "shapleycam",
    "srd",
    "srd_erf",
    "tft",
    "xgradcam",
]
