"""The recorded forward pass of a torchvision VGG (any depth, with or without BatchNorm).

Units are ``[MaxPool ->] Conv -> [BN] -> ReLU`` inside ``features``; the slot of each is the name
of its ReLU (``"features.29"`` is conv5_3's output in vgg16). The classifier's Linear layers are
recorded for the heads (:mod:`fastxai.decomposition.heads`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VGG

from fastxai.decomposition.folding import conv_source
from fastxai.decomposition.gates import Gates, pair
from fastxai.decomposition.support import expect_module, unsupported
from fastxai.decomposition.trace import LinearLayer, PoolRouting, Trace, Unit, VGGHeadInputs


def _features(
    features: nn.Sequential, x: Tensor, gates: Gates
) -> tuple[list[Unit], str, Tensor, PoolRouting | None, dict[str, str]]:
    """Units of ``features``; returns them, the last slot and activation, and a trailing pool."""
    units: list[Unit] = []
    aliases: dict[str, str] = {}
    slot, activation, pool = "input", x, None
    modules = list(features)
    i = 0
    while i < len(modules):
        module, name = modules[i], f"features.{i}"
        if isinstance(module, nn.MaxPool2d):
            if pool is not None:
                raise unsupported(f"{name} (MaxPool2d right after another MaxPool2d)")
            if module.ceil_mode:
                raise unsupported(f"{name} (MaxPool2d with ceil_mode=True)")
            pool = gates.maxpool(name, activation, module)
            i += 1
            continue
        if not isinstance(module, nn.Conv2d):
            raise unsupported(f"{name} ({type(module).__name__}) in features")
        j = i + 1
        bn = modules[j] if j < len(modules) and isinstance(modules[j], nn.BatchNorm2d) else None
        j += bn is not None
        relu_name = f"features.{j}"
        if j >= len(modules) or not isinstance(modules[j], nn.ReLU):
            found = type(modules[j]).__name__ if j < len(modules) else "the end of features"
            raise unsupported(f"{relu_name} ({found}) after {name}; expected ReLU")
        inputs = activation if pool is None else pool.pooled
        source, z = conv_source(slot, inputs, module, bn, name, pool)
        units.append(Unit(relu_name, z, [source]))
        aliases[name] = relu_name
        if bn is not None:
            aliases[f"features.{i + 1}"] = relu_name
        slot, activation, pool = relu_name, gates.relu(relu_name, z), None
        i = j + 1
    if not units:
        raise unsupported("a VGG whose features hold no Conv2d")
    return units, slot, activation, pool, aliases


def _classifier(classifier: nn.Sequential, flat: Tensor, gates: Gates) -> list[LinearLayer]:
    """Run the classifier: ``Linear`` layers, each optionally followed by ReLU and Dropout."""
    layers: list[LinearLayer] = []
    current = flat
    for i, module in enumerate(classifier):
        name = f"classifier.{i}"
        if isinstance(module, nn.Linear):
            weight = module.weight.detach()
            bias = None if module.bias is None else module.bias.detach()
            preact = F.linear(current, weight, bias)
            layers.append(LinearLayer(weight, bias, current, preact, None))
            current = preact
        elif isinstance(module, nn.ReLU):
            if not layers or layers[-1].relu_slot is not None:
                raise unsupported(f"{name} (ReLU not directly after a Linear)")
            layers[-1].relu_slot = name
            current = gates.relu(name, current)
        elif not isinstance(module, nn.Dropout):  # eval-mode Dropout is the identity
            raise unsupported(f"{name} ({type(module).__name__}) in classifier")
    if not layers or layers[-1].relu_slot is not None:
        raise unsupported("a VGG classifier that does not end with a Linear layer (the logits)")
    return layers


def walk_vgg(model: VGG, x: Tensor, gates: Gates) -> Trace:
    """Run ``model`` on ``x`` unit by unit (BN folded, parameters detached), recording a Trace."""
    expect_module(model.features, nn.Sequential, "features")
    expect_module(model.avgpool, nn.AdaptiveAvgPool2d, "avgpool")
    expect_module(model.classifier, nn.Sequential, "classifier")
    units, slot, activation, pool, aliases = _features(model.features, x, gates)
    pooled = activation if pool is None else pool.pooled
    avgpool_size = pair(model.avgpool.output_size)
    flat = F.adaptive_avg_pool2d(pooled, avgpool_size).flatten(1)
    linears = _classifier(model.classifier, flat, gates)
    sizes = {"input": (x.shape[-2], x.shape[-1])}
    sizes.update({u.name: (u.preact.shape[-2], u.preact.shape[-1]) for u in units})
    aliases["features"] = slot
    head = VGGHeadInputs(
        final_pool=pool,
        pooled_size=(pooled.shape[-2], pooled.shape[-1]),
        avgpool_size=avgpool_size,
        linears=linears,
    )
    return Trace(
        arch="vgg",
        units=units,
        head_slot=slot,
        features=activation,
        logits=linears[-1].preact,
        vgg=head,
        slot_sizes=sizes,
        aliases=aliases,
    )
