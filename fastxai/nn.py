"""Thin ``torch.nn`` wrappers for interop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from fastxai.capture import prepare
from fastxai.explanation import Explanation
from fastxai.methods import METHODS
from fastxai.methods._base import Layer, normalise_layers


class Explainer(nn.Module):
    """An ``nn.Module`` whose forward returns the model's logits and their explanation.

    ``Explainer(model, "layer4", method="gradcam", tft=False)(x, targets=None)`` returns
    ``(logits, explanation)`` with one forward of the model (the explanation's own). The model is
    a child module, so ``.to(device)`` moves it; the explainer never changes its mode.

    The model is split at the layers at construction, so ``torch.compile(explainer,
    fullgraph=True)`` compiles the whole explanation (forward, gradient, map, TFT) as one graph.
    Under compilation the value checks (NaN/Inf in ``x``, class range of tensor targets, maps in
    [0, 1]) are skipped: they read tensor values. Mixed precision: call it under
    ``torch.autocast``; the maps are computed in float32.
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
        # torch.fx cannot run inside torch.compile: split the model at the layers now, so that
        # torch.compile(explainer, fullgraph=True) works from the first call.
        prepare(model, normalise_layers(model, layer))
        self.method = method
        self.tft = tft
        self.options = options

    def forward(self, x: Tensor, targets: Any = None) -> tuple[Tensor, Explanation]:
        explanation = METHODS[self.method](
            self.model, x, self.layer, targets, tft=self.tft, **self.options
        )
        return explanation.logits, explanation
