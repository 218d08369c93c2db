"""The one result type every fastxai method returns."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor


@dataclass
class Explanation:
    """Batched explanation of a model's decision, on the input's device.

    Attributes:
        maps: ``(N, H, W)`` float saliency at input resolution, each map in ``[0, 1]``.
        raw: ``(N, h, w)`` float map before ReLU and normalisation (feature resolution for the CAM
            family; the first layer's when several layers are fused), or ``None``.
        targets: ``(N,)`` long class explained per image (``-1`` when a callable target was used).
        logits: ``(N, num_classes)`` model output for the unmodified input.
        mask: ``(N, H, W)`` bool kept-pixel mask (TFT, Activation Matching), else ``None``.
        tau: ``(N,)`` chosen threshold per image (TFT), else ``None``.
        rpi: ``(N, T)`` relative probability increase per threshold (TFT), else ``None``.
        extras: method-specific values (per-layer maps, channel weights, loss history, ...).
    """

    maps: Tensor
    targets: Tensor
    logits: Tensor
    raw: Tensor | None = None
    mask: Tensor | None = None
    tau: Tensor | None = None
    rpi: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.maps.shape[0]

    def to(self, device: torch.device | str) -> Explanation:
        """Return a copy with every tensor moved to ``device``."""
        moved = {
            f.name: (v.to(device) if isinstance(v, Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        moved["extras"] = {
            k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.extras.items()
        }
        return Explanation(**moved)

    def numpy(self) -> Any:
        """The maps as a float32 numpy array ``(N, H, W)`` (what pytorch-grad-cam returns)."""
        return self.maps.detach().float().cpu().numpy()
