"""pytorch-grad-cam's ``utils.find_layers``: finding layers to explain, and swapping layers.

The finders only read the model. The two ``replace_*`` functions change it in place, which is
what they are for: call them on a copy (``copy.deepcopy(model)``) to keep the original.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn


def find_layer_predicate_recursive(
    model: nn.Module, predicate: Callable[[nn.Module], bool]
) -> list[nn.Module]:
    """Every submodule below ``model`` (not ``model`` itself) for which ``predicate`` holds, in
    depth-first registration order; a shared module appears once per place it is registered."""
    found = []
    for child in model._modules.values():  # not children(): it lists a shared module once
        if child is None:
            continue
        if predicate(child):
            found.append(child)
        found.extend(find_layer_predicate_recursive(child, predicate))
    return found


def find_layer_types_recursive(
    model: nn.Module, layer_types: Iterable[type[nn.Module]]
) -> list[nn.Module]:
    """Every submodule whose type is exactly one of ``layer_types`` (subclasses do not count)."""
    wanted = tuple(layer_types)
    return find_layer_predicate_recursive(model, lambda layer: type(layer) in wanted)


def replace_layer_recursive(model: nn.Module, old_layer: nn.Module, new_layer: nn.Module) -> bool:
    """Put ``new_layer`` where ``old_layer`` is first registered below ``model``, in place;
    whether it was found."""
    for name, child in model._modules.items():
        if child is old_layer:
            model._modules[name] = new_layer
            return True
        if child is None:
            continue
        if replace_layer_recursive(child, old_layer, new_layer):
            return True
    return False


def replace_all_layer_type_recursive(
    model: nn.Module, old_layer_type: type[nn.Module], new_layer: nn.Module
) -> None:
    """Put ``new_layer`` (the same module everywhere) in place of every submodule that is an
    instance of ``old_layer_type``, in place."""
    for name, child in list(model._modules.items()):
        if child is None:
            continue
        if isinstance(child, old_layer_type):
            model._modules[name] = new_layer
        replace_all_layer_type_recursive(child, old_layer_type, new_layer)
