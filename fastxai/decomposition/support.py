"""Which networks SRD decomposes, and the errors that name what it cannot."""

from __future__ import annotations

from torch import nn


class UnsupportedModelError(TypeError):
    """The model contains a module SRD cannot decompose (the message names its type)."""


SUPPORTED = "torchvision ResNet (BasicBlock, Bottleneck) and VGG (with or without BatchNorm)"


def unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"srd does not support {what}; it supports {SUPPORTED}")


def expect_module(module: object, kind: type[nn.Module], name: str) -> None:
    if not isinstance(module, kind):
        raise unsupported(f"{name} ({type(module).__name__}) where {kind.__name__} was expected")


def architecture(model: nn.Module) -> str:
    """``"resnet"`` or ``"vgg"``; anything else raises :class:`UnsupportedModelError`."""
    from torchvision.models import VGG, ResNet

    if isinstance(model, ResNet):
        return "resnet"
    if isinstance(model, VGG):
        return "vgg"
    raise unsupported(f"the model type {type(model).__name__}")


def check_eval_mode(model: nn.Module, function: str) -> None:
    """BatchNorm must use running statistics and Dropout must be off: a per-image affine map."""
    for name, module in model.named_modules():
        if module.training and isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            raise ValueError(
                f"{function}: model is in training mode ({name or 'the model'}: "
                f"{type(module).__name__} uses batch statistics or random masks); SRD decomposes "
                "the eval-mode network: call model.eval() (fastxai never changes the mode itself)"
            )
