"""Dispatch to the architecture's recorded forward pass."""

from __future__ import annotations

from torch import Tensor, nn

from fastxai.decomposition.gates import Gates
from fastxai.decomposition.support import architecture
from fastxai.decomposition.trace import Trace


def trace_forward(model: nn.Module, x: Tensor, gates: Gates | None = None) -> Trace:
    """Run ``model`` on ``x`` recording every unit (and, in ``gates``, every ReLU gate and max-pool
    arg-max; a ``Gates`` built from another pass replays that pattern instead)."""
    gates = Gates(record_relu=False) if gates is None else gates
    if architecture(model) == "resnet":
        from fastxai.decomposition.walk_resnet import walk_resnet

        return walk_resnet(model, x, gates)  # type: ignore[arg-type]
    from fastxai.decomposition.walk_vgg import walk_vgg

    return walk_vgg(model, x, gates)  # type: ignore[arg-type]
