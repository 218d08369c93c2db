"""ReLU gates and max-pool routes: recorded by a normal forward, replayed by APOP's forward."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fastxai.decomposition.trace import Pair, PoolRouting


def pair(value: int | tuple[int, ...]) -> Pair:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[-1]))


class Gates:
    """Every ReLU gate :math:`1[z > 0]` and max-pool arg-max of one forward pass, by name.

    SRD itself needs only the max-pool arg-max (``record_relu=False`` skips the gates).

    ``Gates()`` records them while applying the ordinary ReLU and max-pool; ``Gates(recorded)``
    replays a recorded pattern: the ReLU becomes :math:`z \\odot 1[z_{pattern} > 0]` and the
    max-pool gathers at the pattern's arg-max positions (APOP).
    """

    def __init__(self, replay: Gates | None = None, *, record_relu: bool = True) -> None:
        self.masks: dict[str, Tensor] = {}
        self.indices: dict[str, Tensor] = {}
        self.replay = replay
        self.record_relu = record_relu

    def relu(self, name: str, z: Tensor) -> Tensor:
        if self.replay is not None:
            return z * self.replay.masks[name]
        if self.record_relu:
            self.masks[name] = z > 0
        return z.clamp_min(0)

    def maxpool(self, name: str, v: Tensor, pool: nn.MaxPool2d) -> PoolRouting:
        kernel, stride = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size)
        padding, dilation = pair(pool.padding), pair(pool.dilation)
        if self.replay is not None:
            indices = self.replay.indices[name]
            pooled = v.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)
        else:
            pooled, indices = F.max_pool2d(
                v, kernel, stride, padding, dilation, ceil_mode=False, return_indices=True
            )
            self.indices[name] = indices
        size = (v.shape[-2], v.shape[-1])
        return PoolRouting(pooled, indices, size, kernel, stride, padding, dilation)
