"""The recorded forward pass of a torchvision ResNet (BasicBlock or Bottleneck blocks).

Slots: ``"input"``; ``"relu"`` (stem); per block ``"<block>.relu@0"``, (Bottleneck)
``"<block>.relu@1"``, and ``"<block>"`` for the block output (the last ReLU call).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from fastxai.decomposition.folding import conv_source
from fastxai.decomposition.gates import Gates
from fastxai.decomposition.support import expect_module, unsupported
from fastxai.decomposition.trace import LinearSource, PoolRouting, Trace, Unit


def _shortcut(
    block: nn.Module, name: str, slot: str, inputs: Tensor, pool: PoolRouting | None
) -> tuple[LinearSource, Tensor]:
    """The shortcut source: identity (``c = x_q``) or the downsample ``conv1x1 + BN``."""
    if block.downsample is None:
        return LinearSource(slot=slot, inputs=inputs, weight=None, pool=pool), inputs
    ds = block.downsample
    parts = list(ds) if isinstance(ds, nn.Sequential) else [ds]
    if (
        len(parts) != 2
        or not isinstance(parts[0], nn.Conv2d)
        or not isinstance(parts[1], nn.BatchNorm2d)
    ):
        kinds = ", ".join(type(p).__name__ for p in parts)
        raise unsupported(f"{name}.downsample ({kinds}); expected Sequential(Conv2d, BatchNorm2d)")
    return conv_source(slot, inputs, parts[0], parts[1], f"{name}.downsample", pool)


def _block(
    block: nn.Module,
    name: str,
    slot: str,
    activation: Tensor,
    pool: PoolRouting | None,
    gates: Gates,
    units: list[Unit],
) -> Tensor:
    """Record one residual block reading ``activation`` (through ``pool`` if merged)."""
    inputs = activation if pool is None else pool.pooled
    if isinstance(block, Bottleneck):
        convs = [(block.conv1, block.bn1), (block.conv2, block.bn2), (block.conv3, block.bn3)]
    else:
        convs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    for i, (conv, bn) in enumerate(convs):
        expect_module(conv, nn.Conv2d, f"{name}.conv{i + 1}")
        expect_module(bn, nn.BatchNorm2d, f"{name}.bn{i + 1}")
    expect_module(block.relu, nn.ReLU, f"{name}.relu")
    current_slot, current, current_pool = slot, inputs, pool
    for i, (conv, bn) in enumerate(convs[:-1]):
        source, z = conv_source(
            current_slot, current, conv, bn, f"{name}.conv{i + 1}", current_pool
        )
        unit_name = f"{name}.relu@{i}"
        units.append(Unit(unit_name, z, [source]))
        current_slot, current, current_pool = unit_name, gates.relu(unit_name, z), None
    conv, bn = convs[-1]
    main, z_main = conv_source(current_slot, current, conv, bn, f"{name}.conv{len(convs)}")
    shortcut, z_shortcut = _shortcut(block, name, slot, inputs, pool)
    preact = z_main + z_shortcut
    units.append(Unit(name, preact, [main, shortcut]))
    return gates.relu(name, preact)


def walk_resnet(model: ResNet, x: Tensor, gates: Gates) -> Trace:
    """Run ``model`` on ``x`` unit by unit (BN folded, parameters detached), recording a Trace."""
    expect_module(model.conv1, nn.Conv2d, "conv1")
    expect_module(model.bn1, nn.BatchNorm2d, "bn1")
    expect_module(model.relu, nn.ReLU, "relu")
    expect_module(model.maxpool, nn.MaxPool2d, "maxpool")
    expect_module(model.avgpool, nn.AdaptiveAvgPool2d, "avgpool")
    expect_module(model.fc, nn.Linear, "fc")
    if model.avgpool.output_size not in (1, (1, 1)):
        raise unsupported(
            f"avgpool (AdaptiveAvgPool2d to {model.avgpool.output_size}); "
            "expected a global average pool"
        )
    if model.maxpool.ceil_mode:
        raise unsupported("maxpool (MaxPool2d with ceil_mode=True)")
    units: list[Unit] = []
    stem, z = conv_source("input", x, model.conv1, model.bn1, "conv1")
    units.append(Unit("relu", z, [stem]))
    activation = gates.relu("relu", z)
    pool: PoolRouting | None = gates.maxpool("maxpool", activation, model.maxpool)
    slot = "relu"
    sizes = {"input": (x.shape[-2], x.shape[-1]), "relu": (z.shape[-2], z.shape[-1])}
    aliases: dict[str, str] = {"conv1": "relu", "bn1": "relu"}
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        blocks = getattr(model, stage)
        expect_module(blocks, nn.Sequential, stage)
        for index, block in enumerate(blocks):
            name = f"{stage}.{index}"
            if not isinstance(block, (BasicBlock, Bottleneck)):
                raise unsupported(
                    f"{name} ({type(block).__name__}); expected BasicBlock or Bottleneck"
                )
            activation = _block(block, name, slot, activation, pool, gates, units)
            slot, pool = name, None
            last_call = 2 if isinstance(block, Bottleneck) else 1
            aliases[f"{name}.relu@{last_call}"] = name
        aliases[stage] = slot
    for unit in units:
        sizes[unit.name] = (unit.preact.shape[-2], unit.preact.shape[-1])
    pooled = activation.mean((2, 3))
    fc_weight = model.fc.weight.detach()
    fc_bias = None if model.fc.bias is None else model.fc.bias.detach()
    logits = F.linear(pooled, fc_weight, fc_bias)
    aliases["avgpool"] = slot
    return Trace(
        arch="resnet",
        units=units,
        head_slot=slot,
        features=activation,
        logits=logits,
        fc_weight=fc_weight,
        fc_bias=fc_bias,
        slot_sizes=sizes,
        aliases=aliases,
    )
