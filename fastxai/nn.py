"""Thin ``torch.nn`` wrappers for interop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from fastxai.capture import prepare
from fastxai.explanation import Explanation
from fastxai.methods import METHODS
from fastxai.methods._base import Layer, check_create_graph, normalise_layers


class Explainer(nn.Module):
    """An ``nn.Module`` whose forward returns the model's logits and their explanation.

    ``Explainer(model, "layer4", method="gradcam", tft=False, create_graph=False)(x, targets=None)``
    returns ``(logits, explanation)`` with one forward of the model (the explanation's own). The
    model is a child module, so ``.to(device)`` moves it; the explainer never changes its mode.

    Training loops: with grad enabled the forward is the model's forward of the step. The logits
    keep their autograd graph to the parameters (one forward serves the loss and the
    explanation), and in training mode BatchNorm's running statistics update once, as in
    ``model(x)`` (Score-CAM's, Ablation-CAM's and TFT's extra forwards change nothing; a call that
    raises gives every buffer back). ``create_graph=True`` also makes ``explanation.maps`` and
    ``explanation.raw`` differentiable w.r.t. the parameters (double backward through the
    gradient at the layer) for explanation-guided losses, with Grad-CAM, Grad-CAM++, XGrad-CAM,
    Layer-CAM, HiResCAM and CAM; other methods, ``tft`` and ``eigen_smooth`` refuse it. The
    explainer itself writes no ``.grad`` and leaves no hook::

        explainer = Explainer(model, "layer4", create_graph=True)
        logits, explanation = explainer(x, y)
        loss = F.cross_entropy(logits, y) + lam * (explanation.maps * (1 - masks)).mean()
        loss.backward()
        optimizer.step()

    Under ``torch.no_grad`` nothing is recorded and no buffer changes (an evaluation pass).

    The model is split at the layers at construction, so ``torch.compile(explainer,
    fullgraph=True)`` compiles the whole explanation (forward, gradient, map, TFT) as one graph,
    the graph of a training step included (its backward runs outside, as usual).
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
        create_graph: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        check_create_graph(method, create_graph)
        self.model = model
        self.layer = layer
        # torch.fx cannot run inside torch.compile: split the model at the layers now, so that
        # torch.compile(explainer, fullgraph=True) works from the first call.
        prepare(model, normalise_layers(model, layer))
        self.method = method
        self.tft = tft
        self.create_graph = create_graph
        self.options = options

    def forward(self, x: Tensor, targets: Any = None) -> tuple[Tensor, Explanation]:
        explanation = METHODS[self.method](
            self.model,
            x,
            self.layer,
            targets,
            tft=self.tft,
            logits_graph=True,
            create_graph=self.create_graph,
            **self.options,
        )
        return explanation.logits, explanation
