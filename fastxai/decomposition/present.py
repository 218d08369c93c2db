"""What the ``fastxai`` command needs for SRD: a CAM-style entry point and the support messages.

``fastxai explain --method srd --model resnet50 --weights resnet50.pth IMAGE`` calls
:func:`explain_with_srd`; ``fastxai demo`` prints :data:`DEMO_SKIP_MESSAGE` instead of a map,
because the demo's EfficientNet-Lite0 is not a network SRD decomposes.
"""

from __future__ import annotations

from torch import Tensor, nn

from fastxai.decomposition.explain import srd
from fastxai.decomposition.support import SUPPORTED, UnsupportedModelError, architecture
from fastxai.explanation import Explanation
from fastxai.targets import Targets

SRD_METHOD = "srd"
SRD_EXAMPLE = "fastxai explain --method srd --model resnet50 --weights resnet50.pth IMAGE"
DEMO_SKIP_MESSAGE = (
    f"srd: skipped: SRD decomposes {SUPPORTED} only, so it does not support the "
    f"EfficientNet-Lite0 demo model (try: {SRD_EXAMPLE})"
)


def explain_with_srd(
    model: nn.Module, x: Tensor, layer: str | None = None, targets: Targets = None
) -> Explanation:
    """:func:`fastxai.srd` (contrastive rule, the paper's head) with the CAM methods' call
    signature ``(model, x, layer, targets)``. ``layer`` is ignored: SRD decomposes the whole
    network from the classifier to the input pixels."""
    return srd(model, x, targets)


def unsupported_model_message(model: nn.Module, model_name: str) -> str | None:
    """``None`` when SRD supports ``model``, else a one-line reason naming ``model_name``."""
    try:
        architecture(model)
    except UnsupportedModelError:
        return (
            f"--method {SRD_METHOD}: SRD supports {SUPPORTED}; {model_name} "
            f"({type(model).__name__}) is not supported (e.g. {SRD_EXAMPLE})"
        )
    return None
