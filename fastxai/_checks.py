"""Input validation shared by every public function: clear errors that name the argument.

Checks of shapes, dtypes and devices read only metadata and run everywhere. Checks that read
tensor values (NaN/Inf in ``x`` or ``maps``, maps in [0, 1], the class range of tensor targets,
thresholds given as a tensor) run in eager mode and are skipped under
``torch.compiler.is_compiling()``: a branch on a value is a graph break, and a device-side assert
would cost a synchronisation per call. Call the function once eagerly on representative input to
validate it, then compile.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Hashable

import torch
from torch import Tensor, nn

_WARNED_TRAINING: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_WARNED_ONCE: set[Hashable] = set()


def model_device(model: nn.Module) -> torch.device | None:
    """Device of the model's first parameter or buffer (``None`` for a parameter-free model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def warn_user(message: str) -> None:
    """``warnings.warn`` pointing at the user's line: the first frame outside fastxai."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("fastxai"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def warn_user_once(key: Hashable, message: str) -> None:
    """:func:`warn_user` the first time ``key`` is seen in this process."""
    if key not in _WARNED_ONCE:
        _WARNED_ONCE.add(key)
        warn_user(message)


def check_model(model: nn.Module, forward_of_loss: bool = False) -> None:
    """``model`` is an ``nn.Module``; warn once per model in training mode, unless the call is
    the forward of a training step (``forward_of_loss``): a model trained through
    :class:`fastxai.nn.Explainer` is in training mode on purpose, and is not warned about."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training and forward_of_loss:
        _WARNED_TRAINING.add(model)
    if model.training and model not in _WARNED_TRAINING:
        _WARNED_TRAINING.add(model)
        warn_user(
            f"model ({type(model).__name__}) is in training mode: it is explained as it is "
            "(BatchNorm normalises with the batch's statistics, Dropout drops) and its running "
            "statistics are not updated; call model.eval() first for the usual explanation"
        )


def check_images(model: nn.Module, x: Tensor, name: str = "x") -> None:
    """``x`` must be a finite floating (N, C, H, W) tensor on the model's device."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    device = model_device(model)
    if device is not None and x.device != device:
        raise ValueError(
            f"{name} is on {x.device} but the model's parameters are on {device}; "
            f"move one of them (e.g. {name}.to({str(device)!r}))"
        )
    check_input_fits(model, x, name)
    if not torch.compiler.is_compiling() and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def _first_leaf_with_weights(model: nn.Module) -> nn.Module | None:
    for module in model.modules():
        is_leaf = next(module.children(), None) is None
        if is_leaf and next(module.parameters(False), None) is not None:
            return module
    return None


def check_input_fits(model: nn.Module, x: Tensor, name: str = "x") -> None:
    """``x``'s dtype is the model's (outside autocast), and its channels fit the model's first
    layer with weights when that is a convolution (the stem of every vision model)."""
    first = _first_leaf_with_weights(model)
    if first is None:
        return
    weight_dtype = next(first.parameters()).dtype
    autocasting = torch.is_autocast_enabled(x.device.type)
    if not autocasting and weight_dtype.is_floating_point and x.dtype != weight_dtype:
        raise TypeError(
            f"{name} is {x.dtype} but the model's weights are {weight_dtype}; convert one "
            f"(e.g. {name}.to({weight_dtype}))"
        )
    if isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and x.dim() == 4:
        expected = first.in_channels
        if x.shape[1] != expected:
            raise ValueError(
                f"{name} has {x.shape[1]} channels but the model's first layer takes "
                f"{expected}; {name} must be (N, {expected}, H, W)"
            )


def check_maps(x: Tensor, maps: Tensor, name: str = "maps") -> None:
    """``maps`` must be a finite ``(N, H, W)`` tensor matching ``x`` ``(N, C, H, W)``."""
    n, _, height, width = x.shape
    if not isinstance(maps, Tensor) or maps.shape != (n, height, width):
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"{name} must have shape ({n}, {height}, {width}) like x, got {shape}")
    if maps.device != x.device:
        raise ValueError(f"{name} is on {maps.device} but x is on {x.device}")
    if maps.numel() and not torch.compiler.is_compiling() and not bool(torch.isfinite(maps).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
