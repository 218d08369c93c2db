"""Amortised Activation Matching: one generator trained over many images, which then explains a
new image in a single forward pass (no per-image training).

Training minimises the mean over a mini-batch of the per-image loss of
:func:`fastxai.activation_matching` (same terms, weights and straight-through mask), with the one
generator's weights shared by every image. The generator is, by default, a small decoder of the
classifier's own features (:mod:`fastxai.matching.feature_decoder`); ``generator="unet"`` trains
the per-image U-Net of the paper as the shared generator instead (it stalls at ``p = 0.5`` on
photos: benchmarks/README.md). Beyond the paper (it trains per image).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastxai._checks import check_images, check_model
from fastxai.capture import resolve_layer
from fastxai.explanation import Explanation
from fastxai.io import atomic_save
from fastxai.matching.feature_decoder import init_decoder_params
from fastxai.matching.features import MatchedLayer, feature_extractor, normalise_layers
from fastxai.matching.generator import GeneratorParams, init_generator_params
from fastxai.matching.losses import TERMS, LossWeights
from fastxai.matching.paper import check_options, compute_targets, finish_explanation
from fastxai.matching.trainer import (
    StepConfig,
    compiled_step_terms,
    first_non_finite,
    sample_backgrounds,
    step_terms,
)
from fastxai.targets import resolve_targets

GENERATORS = ("features", "unet")


@dataclass
class AmortisedExplainer:
    """A trained shared generator. ``explain(x)`` gives :func:`activation_matching`'s
    :class:`Explanation` for new images from one generator forward (its ``loss_history`` is
    empty; the training history ``(steps, len(TERMS))``, batch means, is ``history``)."""

    model: nn.Module
    params: GeneratorParams
    layers: list[MatchedLayer]
    weights: LossWeights
    history: Tensor
    generator: str = "features"

    def explain(self, x: Tensor, targets: Any = None) -> Explanation:
        """``targets`` only sets the class whose probability ``prob_e`` reports: the generator
        was trained on each image's top-1 and does not read the class."""
        check_model(self.model)
        check_images(self.model, x)
        images = x.detach()
        extractor = feature_extractor(self.model, [layer.name for layer in self.layers])
        target_logits, features = compute_targets(extractor, images, self.layers)
        labels = resolve_targets(targets, target_logits).classes
        empty = images.new_zeros((0, images.shape[0], len(TERMS)), dtype=torch.float32)
        if self.generator == "features":
            for i, (layer, feature) in enumerate(zip(self.layers, features, strict=True)):
                expected = self.params[f"lateral{i}.weight"].shape[1]
                if feature.shape[1] != expected:
                    raise ValueError(
                        f"model: layer {layer.name!r} gives {feature.shape[1]} channels, the "
                        f"generator was trained on {expected}"
                    )
        return finish_explanation(
            extractor,
            self.params,
            images,
            target_logits,
            labels,
            empty,
            self.weights,
            self.layers,
            features,
            self.generator,
            None,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trained generator (weights, matched layers, loss weights, training history,
        kind) to ``path``, atomically (a reader never sees a partial file). The model is not
        saved: :meth:`load` takes it."""
        state = {
            "format": 1,
            "generator": self.generator,
            "params": {name: t.detach().cpu() for name, t in self.params.items()},
            "layers": [list(astuple(layer)) for layer in self.layers],
            "weights": asdict(self.weights),
            "history": self.history.cpu(),
        }
        atomic_save(state, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: nn.Module) -> AmortisedExplainer:
        """The explainer :meth:`save` wrote to ``path``, for ``model`` (the classifier it was
        trained on; its weights go to the device of the model's parameters)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != 1 or state.get("generator") not in GENERATORS:
            raise ValueError(f"path: {os.fspath(path)!r} is not a saved AmortisedExplainer")
        layers = [MatchedLayer(str(n), float(w), str(d)) for n, w, d in state["layers"]]
        for layer in layers:
            resolve_layer(model, layer.name)  # names the missing layer
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        params = {name: t.to(device) for name, t in state["params"].items()}
        weights = LossWeights(**state["weights"])
        return cls(model, params, layers, weights, state["history"], state["generator"])


def train_amortised(
    model: nn.Module,
    images: Tensor,
    *,
    steps: int = 1500,
    batch_size: int = 4,
    lr: float = 1e-4,
    layers: Sequence[Any] | None = None,
    weights: LossWeights | dict[str, float] | None = None,
    seed: int = 0,
    temperature: float = 2.0,
    neighbours: int = 4,
    backgrounds: Sequence[str] = ("normal",),
    width: int = 32,
    depth: int = 4,
    compile: bool = True,
    progress: bool = True,
    generator: str = "features",
    area_warmup: int = 0,
) -> AmortisedExplainer:
    """Train one generator over ``images`` ``(M, C, H, W)`` (each explained for its top-1
    class): Adam on the mean per-image loss of a random mini-batch of ``batch_size`` images per
    step. ``generator``: ``"features"`` (a decoder of the matched layers' features, width
    ``width``; ``depth`` unused) or ``"unet"`` (the U-Net of width ``width`` and depth
    ``depth``). ``area_warmup``: the area weight grows linearly from 0 to its value over the
    first ``area_warmup`` steps, so that the other terms first decide which pixels matter. On
    EfficientNet-Lite0 over photo crops (benchmarks/README.md) the defaults kept the top-1 on
    2/2 held-out photos and 38 % of the training crops; ``lr=1e-3, area_warmup=steps // 2`` on
    2/2 and 46 % with sparser masks (``lr=1e-3`` without the warm-up: 1/2 and 24 %). A warm-up
    long against the binarity weight lets ``p`` saturate at 1 with everything kept (seen on a
    16 x 16 toy problem with ``bin`` 5 and 200 warm-up steps): check ``history``'s area term."""
    from tqdm.auto import tqdm

    check_model(model)
    check_images(model, images, "images")
    check_options(images, steps, lr, temperature, neighbours, backgrounds, width, depth, seed)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if images.shape[0] == 0:
        raise ValueError("images: expected at least one image")
    if not isinstance(area_warmup, int) or area_warmup < 0:
        raise ValueError(f"area_warmup must be an int >= 0, got {area_warmup!r}")
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
    data = images.detach()
    loss_weights = LossWeights.from_any(weights)
    matched = normalise_layers(model, data, layers)
    extractor = feature_extractor(model, [layer.name for layer in matched])
    chunks = [compute_targets(extractor, part, matched) for part in data.split(batch_size)]
    target_logits = torch.cat([c[0] for c in chunks])
    target_features = [torch.cat(f) for f in zip(*(c[1] for c in chunks), strict=True)]
    labels = target_logits.argmax(1)
    if generator == "features":
        params = init_decoder_params(
            [f.shape[1] for f in target_features],
            in_channels=data.shape[1],
            width=width,
            seed=seed,
            device=data.device,
            dtype=data.dtype,
        )
    else:
        params = init_generator_params(
            [seed],
            in_channels=data.shape[1],
            width=width,
            depth=depth,
            device=data.device,
            dtype=data.dtype,
        )
    for t in params.values():
        t.requires_grad_(True)
    config = StepConfig(
        layer_weights=tuple(layer.weight for layer in matched),
        distances=tuple(layer.distance for layer in matched),
        temperature=float(temperature),
        neighbours=neighbours,
        with_necessity=loss_weights.nec > 0,
        generator=generator,
    )
    batch = min(batch_size, data.shape[0])
    mean_weights = loss_weights.as_tensor(data) / batch
    area = TERMS.index("area")
    optimiser = torch.optim.Adam(list(params.values()), lr=lr)
    rng = torch.Generator().manual_seed(seed)
    noise_rng = [torch.Generator(device=data.device).manual_seed(seed + 1)] * batch
    step_fn = compiled_step_terms if compile else step_terms
    history = torch.empty((steps, 1, len(TERMS)))
    order = torch.randperm(data.shape[0], generator=rng)
    cursor = 0
    for step in tqdm(range(steps), desc="amortised AM", disable=not progress, leave=False):
        if cursor + batch > order.numel():
            order, cursor = torch.randperm(data.shape[0], generator=rng), 0
        index = order[cursor : cursor + batch].to(data.device)
        cursor += batch
        x = data[index]
        noise = sample_backgrounds(tuple(backgrounds), x, noise_rng)
        step_weights = mean_weights
        if step < area_warmup:
            step_weights = mean_weights.clone()
            step_weights[area] *= step / area_warmup
        total, terms = step_fn(
            params,
            x,
            noise,
            target_logits[index],
            [f[index] for f in target_features],
            labels[index],
            step_weights,
            extractor,
            config,
        )
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        history[step, 0] = terms.mean(0).cpu()
        if (bad := first_non_finite(history, step, step + 1)) is not None:
            raise FloatingPointError(
                f"train_amortised: the {bad[2]!r} loss term is not finite at step {bad[0]}"
            )
        optimiser.step()
    for t in params.values():
        t.requires_grad_(False)
    return AmortisedExplainer(model, params, matched, loss_weights, history[:, 0], generator)
