"""Thin ``torch.nn`` wrappers for interop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from fastxai.explanation import Explanation
from fastxai.methods import METHODS
from fastxai.methods._base import Layer


class Explainer(nn.Module):
    """An ``nn.Module`` whose forward returns the model's logits and their explanation.

    ``Explainer(model, "layer4", method="gradcam", tft=False)(x, targets=None)`` returns
    ``(logits, explanation)`` with one forward of the model (the explanation's own). The model is
    a child module, so ``.to(device)`` moves it; the explainer never changes its mode.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: Layer | Sequence[Layer],
        method: str = "gradcam",
        tft: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        self.model = model
        self.layer = layer
        self.method = method
        self.tft = tft
        self.options = options

    def forward(self, x: Tensor, targets: Any = None) -> tuple[Tensor, Explanation]:
        explanation = METHODS[self.method](
            self.model, x, self.layer, targets, tft=self.tft, **self.options
        )
        return explanation.logits, explanation
