"""Amortised Activation Matching: one decoder trained over many images, which then explains a new
image with one classifier forward (plus Grad-CAM's backward to the deepest matched layer) and one
batched forward of its area ladder, instead of the stable recipe's deletion rounds.

Same parametrisation as the stable recipe (:mod:`fastxai.matching.ladder`): the decoder
(:mod:`fastxai.matching.feature_decoder`) scores the cells of the stable recipe's grid, and an
explanation keeps the best-scored cells up to each area of the ladder and selects, as the stable
recipe does, the smallest area whose mask keeps the class as the top-1 with
:math:`p(e) \\ge` ``keep_ratio`` :math:`\\cdot p(x)`.

Training (:func:`train_amortised`) follows real-time saliency (Dabkowski & Gal, NeurIPS 2017): the
cell scores, turned into a soft mask of one area of the ladder (:func:`rung_mask`) and bilinearly
upsampled, are trained on the preserver/destroyer hinge losses and squared TV
(:mod:`fastxai.matching.saliency_losses`; the area is imposed, not penalised), with blurred and
noise-plus-colour backgrounds scaled to the training images' per-channel statistics; the class is
the decoder's input through its Grad-CAM map, drawn per image among its top classes. Beyond the
Activation Matching paper, which trains one generator per image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastxai.explanation import Explanation
from fastxai.io import atomic_save
from fastxai.matching import ladder
from fastxai.matching.api import (
    BACKGROUNDS,
    BLUR_SIGMA_224,
    STABLE_WEIGHTS,
    check_ladder_options,
    finish_ladder,
)
from fastxai.matching.feature_decoder import (
    DecoderParams,
    decoder_inputs,
    decoder_logits,
    init_decoder_params,
)
from fastxai.matching.features import (
    MatchedLayer,
    feature_extractor,
    normalise_layers,
    run_extractor,
)
from fastxai.matching.paper import check_batch, compute_targets, prepare_targets
from fastxai.matching.robustness import blurred
from fastxai.matching.saliency_losses import (
    SALIENCY_TERMS,
    SaliencyWeights,
    random_backgrounds,
    saliency_terms,
)

FORMAT = 3
RANKINGS = ("decoder", "gradcam")
SOFT_TEMPERATURE = 0.3
PLAIN_BACKGROUND_SHARE = 1 / 3


def class_evidence(model: nn.Module, x: Tensor, layer: str, labels: Tensor) -> Tensor:
    """``(N, H, W)`` in [0, 1]: Grad-CAM of ``labels`` at ``layer`` (the decoder's class input)."""
    from fastxai.methods.grad_cam import gradcam

    return gradcam(model, x, layer, [int(c) for c in labels]).maps.to(x.dtype)


def cell_grid(size: Sequence[int]) -> tuple[int, int]:
    """The stable recipe's fine cell grid for images of ``size``."""
    return ladder.grid_shape(size, ladder.fine_cell(size))


@dataclass
class AmortisedExplainer:
    """A trained decoder for ``model``. ``explain(x, targets)`` gives an :class:`Explanation`
    like :func:`fastxai.activation_matching`'s stable recipe (the ladder, the selection, the
    same extras; ``recipe`` is ``"amortised"``, ``cell_logits`` the cell scores and
    ``soft_mask`` their :func:`rung_mask` at the selected area, upsampled). ``history``: the
    training terms per step, ``(steps, 3)`` batch means of [smoothness, preserver, destroyer],
    weighted."""

    model: nn.Module
    params: DecoderParams
    layers: list[MatchedLayer]
    weights: SaliencyWeights
    history: Tensor

    def explain(
        self,
        x: Tensor,
        targets: int | Sequence[int] | Tensor | None = None,
        *,
        areas: Sequence[float] = ladder.DEFAULT_AREAS,
        keep_ratio: float = ladder.DEFAULT_KEEP_RATIO,
        background: str = "zero",
        rank_by: str = "decoder",
    ) -> Explanation:
        """Explain class ``targets`` (default: the top-1) of ``x``: the smallest area of
        ``areas`` whose best-scored cells keep it (``background`` as for the stable recipe).
        ``rank_by="gradcam"`` scores the cells by the decoder's class input alone, Grad-CAM at
        the deepest matched layer (the baseline the decoder has to beat)."""
        check_batch(self.model, x)
        if rank_by not in RANKINGS:
            raise ValueError(f"rank_by: expected one of {RANKINGS}, got {rank_by!r}")
        check_ladder_options(areas, keep_ratio, 0.0, 0.0, 1)
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
        images = x.detach()
        matched, extractor, target_logits, features, labels = prepare_targets(
            self.model, images, self.layers, targets
        )
        self._check_features(features)
        grid = cell_grid(images.shape[-2:])
        evidence = class_evidence(self.model, images, matched[-1].name, labels)
        with torch.no_grad():
            inputs = decoder_inputs(features, images, evidence, grid)
            logits = decoder_logits(self.params, inputs) if rank_by == "decoder" else inputs[-1]
            area_values = torch.tensor([float(a) for a in areas])
            result = ladder_from_scores(logits[:, 0], images.shape[-2:], area_values)
            sigma = BLUR_SIGMA_224 * min(images.shape[-2:]) / 224
            backdrop = blurred(images, sigma) if background == "blur" else None
            explanation = finish_ladder(
                extractor,
                result,
                images,
                area_values,
                target_logits,
                labels,
                keep_ratio,
                STABLE_WEIGHTS,
                matched,
                backdrop,
            )
            chosen = explanation.extras["area"].to(logits).nan_to_num(max(areas))
            soft = F.interpolate(
                rung_mask(logits, chosen, SOFT_TEMPERATURE),
                size=images.shape[-2:],
                mode="bilinear",
                align_corners=False,
            )
        extras = explanation.extras
        for key in ("loss_history", "kept_sequence"):
            extras.pop(key)
        extras.update(soft_mask=soft[:, 0], cell_logits=logits[:, 0], recipe="amortised")
        return explanation

    def _check_features(self, features: Sequence[Tensor]) -> None:
        for i, (layer, feature) in enumerate(zip(self.layers, features, strict=True)):
            expected = self.params[f"lateral{i}.weight"].shape[1]
            if feature.shape[1] != expected:
                raise ValueError(
                    f"model: layer {layer.name!r} gives {feature.shape[1]} channels, the "
                    f"decoder was trained on {expected}"
                )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the decoder (weights, matched layers, loss weights, training history) to
        ``path``, atomically. The model is not saved: :meth:`load` takes it."""
        state = {
            "format": FORMAT,
            "params": {name: t.detach().cpu() for name, t in self.params.items()},
            "layers": [[layer.name, layer.weight, layer.distance] for layer in self.layers],
            "weights": asdict(self.weights),
            "history": self.history.cpu(),
        }
        atomic_save(state, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: nn.Module) -> AmortisedExplainer:
        """The explainer :meth:`save` wrote to ``path``, for ``model`` (the classifier it was
        trained on; the decoder goes to the device of the model's parameters)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(
                f"path: {os.fspath(path)!r} is not a saved AmortisedExplainer (format {FORMAT})"
            )
        layers = [MatchedLayer(str(n), float(w), str(d)) for n, w, d in state["layers"]]
        layers = normalise_layers(model, torch.empty(0), layers)  # names a missing layer
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        params = {name: t.to(device) for name, t in state["params"].items()}
        return cls(model, params, layers, SaliencyWeights(**state["weights"]), state["history"])


def rung_mask(scores: Tensor, areas: Tensor, temperature: float) -> Tensor:
    """Soft masks ``(N, 1, g_h, g_w)`` keeping about ``areas`` ``(N,)`` of the cells: the scores,
    standardised per image, through a sigmoid centred on their ``1 - area`` quantile."""
    flat = scores.flatten(1)
    z = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp(min=1e-6)
    ranked = z.sort(1).values
    g = z.shape[1]
    pos = ((1 - areas) * (g - 1)).clamp(0, g - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=g - 1)
    frac = (pos - lo)[:, None]
    threshold = ranked.gather(1, lo[:, None]) * (1 - frac) + ranked.gather(1, hi[:, None]) * frac
    return torch.sigmoid((z - threshold) / temperature).view_as(scores)


def ladder_from_scores(scores: Tensor, size: Sequence[int], areas: Tensor) -> ladder.DeletionResult:
    """The ladder as a deletion sequence: everything kept, then for each area (largest first)
    the best-scored cells (``scores`` ``(N, g_h, g_w)``) whose pixels fit in that area (at least
    one cell)."""
    n, grid = scores.shape[0], tuple(scores.shape[1:])
    cell = ladder.fine_cell(size)
    if grid != ladder.grid_shape(size, cell):
        raise ValueError(
            f"scores: expected the {ladder.grid_shape(size, cell)} cell grid of "
            f"{tuple(size)} images, got {grid}"
        )
    flat = scores.flatten(1)
    ones = torch.ones((1, *grid), dtype=torch.bool, device=scores.device)
    starts = [torch.arange(g, device=scores.device) * cell for g in grid]
    rows, cols = ((s - start).clamp(max=cell) for s, start in zip(size, starts, strict=True))
    counts = (rows[:, None] * cols[None, :]).float()
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices  # (N, G)
    cumulative = counts.flatten()[order].cumsum(1) / (size[0] * size[1])  # (N, G)
    masks = [ladder.cells_to_pixels(ones.expand(n, *grid), cell, size)]
    for area in areas.flip(0).tolist():
        k = (cumulative <= area + 1e-9).sum(1).clamp(min=1)  # (N,)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        keep = (ranks < k[:, None]).view(n, *grid)
        masks.append(ladder.cells_to_pixels(keep, cell, size))
    kept = torch.stack([m.flatten(1).float().mean(1) for m in masks])
    terms = scores.new_full((len(masks), n, len(ladder.SCORED_TERMS)), float("nan"))
    return ladder.DeletionResult(masks, kept, terms)


def _check_training_options(
    steps: int,
    batch_size: int,
    lr: float,
    top_classes: int,
    top1_share: float,
    temperature: float,
) -> None:
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if not isinstance(top_classes, int) or isinstance(top_classes, bool) or top_classes < 1:
        raise ValueError(f"top_classes: expected an int >= 1, got {top_classes!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"lr: expected a number > 0, got {lr!r}")
    if not isinstance(top1_share, (int, float)) or isinstance(top1_share, bool):
        raise ValueError(f"top1_share: expected a number in [0, 1], got {top1_share!r}")
    if not 0 <= top1_share <= 1:
        raise ValueError(f"top1_share: expected a number in [0, 1], got {top1_share!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")


@dataclass
class _TrainingSet:
    """Per image: the decoder inputs that do not depend on the class (features and image on the
    grid), the evidence maps of its top classes on the grid ``(M, k, 1, g_h, g_w)`` and those
    classes ``(M, k)``."""

    shared: list[Tensor]
    evidence: Tensor
    classes: Tensor


def _encode_training_set(
    model: nn.Module,
    images: Tensor,
    matched: list[MatchedLayer],
    top_classes: int,
    chunk: int,
) -> _TrainingSet:
    extractor = feature_extractor(model, [layer.name for layer in matched])
    grid = cell_grid(images.shape[-2:])
    shared_parts, evidence_parts, class_parts = [], [], []
    for part in images.split(chunk):
        logits, features = compute_targets(extractor, part, matched)
        k = min(top_classes, logits.shape[1])
        classes = logits.topk(k, 1).indices
        maps = [class_evidence(model, part, matched[-1].name, classes[:, j]) for j in range(k)]
        with torch.no_grad():
            inputs = [decoder_inputs(features, part, m, grid) for m in maps]
        shared_parts.append(inputs[0][:-1])
        evidence_parts.append(torch.stack([i[-1] for i in inputs], 1))
        class_parts.append(classes)
    shared = [torch.cat(p) for p in zip(*shared_parts, strict=True)]
    return _TrainingSet(shared, torch.cat(evidence_parts), torch.cat(class_parts))


def train_amortised(
    model: nn.Module,
    images: Tensor,
    *,
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 3e-3,
    layers: Sequence[Any] | None = None,
    weights: SaliencyWeights | dict[str, float] | None = None,
    top_classes: int = 3,
    top1_share: float = 0.7,
    width: int = 32,
    areas: Sequence[float] = ladder.DEFAULT_AREAS,
    temperature: float = SOFT_TEMPERATURE,
    seed: int = 0,
    progress: bool = True,
) -> AmortisedExplainer:
    r"""Train the decoder over ``images`` ``(M, C, H, W)``: Adam (``lr``) on the real-time
    saliency loss (``weights``: :class:`SaliencyWeights`) of a random mini-batch of
    ``batch_size`` images per step, ``steps`` steps. Each image is explained, per step, for its
    top-1 class with probability ``top1_share`` and otherwise for one of its next
    ``top_classes - 1`` classes, so the decoder learns to read the class from the evidence map,
    and at one of ``areas`` drawn at random: its soft mask keeps that area of the cells
    (:func:`rung_mask`, sharpness ``temperature``), so training improves the ranking at every
    rung of the ladder that explanations read off it. The preserver sees the hard cells an
    explanation would keep (gradients through the soft mask, straight-through), on the
    explanation's own background (zero, the paper's mean colour) for a third of the images and
    on real-time saliency's blurred or noise backgrounds otherwise: trained on soft masks and
    those backgrounds alone, the decoder ranked the cells worse than its Grad-CAM input on the
    hard, mean-colour masks it is judged by (benchmarks/README.md). ``seed`` sets the decoder's
    start, the batches, classes, areas and backgrounds."""
    from tqdm.auto import tqdm

    check_batch(model, images)
    _check_training_options(steps, batch_size, lr, top_classes, top1_share, temperature)
    area_values = torch.tensor([float(a) for a in areas])
    check_ladder_options(area_values.tolist(), ladder.DEFAULT_KEEP_RATIO, 0.0, 0.0, 1)
    if isinstance(weights, dict):
        weights = SaliencyWeights(**weights)
    loss_weights = weights or SaliencyWeights()
    data = images.detach()
    matched = normalise_layers(model, data, layers)
    extractor = feature_extractor(model, [layer.name for layer in matched])
    encoded = _encode_training_set(model, data, matched, top_classes, batch_size)
    params = init_decoder_params(
        [t.shape[1] for t in encoded.shared[:-1]],
        in_channels=data.shape[1],
        width=width,
        seed=seed,
        device=data.device,
        dtype=data.dtype,
    )
    for t in params.values():
        t.requires_grad_(True)
    mean = data.mean((0, 2, 3), keepdim=True)
    scale = data.std((0, 2, 3), keepdim=True).clamp(min=1e-6)
    optimiser = torch.optim.Adam(list(params.values()), lr=lr)
    rng = torch.Generator().manual_seed(seed)
    noise_rng = torch.Generator(device=data.device).manual_seed(seed + 1)
    batch = min(batch_size, data.shape[0])
    k = encoded.classes.shape[1]
    history = torch.empty((steps, len(SALIENCY_TERMS)))
    order, cursor = torch.randperm(data.shape[0], generator=rng), 0
    for step in tqdm(range(steps), desc="amortised AM", disable=not progress, leave=False):
        if cursor + batch > order.numel():
            order, cursor = torch.randperm(data.shape[0], generator=rng), 0
        index = order[cursor : cursor + batch]
        cursor += batch
        other = torch.randint(1, max(k, 2), (batch,), generator=rng).clamp(max=k - 1)
        use_top1 = torch.rand(batch, generator=rng) < top1_share
        choice = torch.where(use_top1, torch.zeros_like(other), other).to(data.device)
        index = index.to(data.device)
        labels = encoded.classes[index, choice]
        inputs = [t[index] for t in encoded.shared] + [encoded.evidence[index, choice]]
        x = data[index]
        scores = decoder_logits(params, inputs)
        rung = area_values[torch.randint(len(area_values), (batch,), generator=rng)].to(x)
        cells = rung_mask(scores, rung, temperature)
        mask = F.interpolate(cells, size=x.shape[-2:], mode="bilinear", align_corners=False)
        # the preserver sees the cells an explanation keeps (straight-through: gradients of the
        # soft mask), on the explanation's background for a third of the images
        hard = (cells > 0.5).to(cells) + cells - cells.detach()
        kept = F.interpolate(hard, size=x.shape[-2:], mode="nearest")
        noisy, backdrop = random_backgrounds(x, mean, scale, noise_rng)
        plain = torch.rand((batch, 1, 1, 1), generator=rng) < PLAIN_BACKGROUND_SHARE
        preserver_backdrop = torch.where(plain.to(x.device), torch.zeros_like(x), backdrop)
        preserved = kept * noisy + (1 - kept) * preserver_backdrop
        destroyed = (1 - mask) * noisy + mask * backdrop
        logits, _ = run_extractor(extractor, torch.cat([preserved, destroyed]))
        terms = saliency_terms(mask, logits[:batch], logits[batch:], labels, loss_weights)
        history[step] = terms.detach().mean(0).cpu()
        if not bool(torch.isfinite(history[step]).all()):
            bad = SALIENCY_TERMS[int((~torch.isfinite(history[step])).nonzero()[0, 0])]
            raise FloatingPointError(
                f"train_amortised: the {bad!r} loss term is not finite at step {step}"
            )
        optimiser.zero_grad(set_to_none=True)
        terms.sum(1).mean().backward()
        optimiser.step()
    for t in params.values():
        t.requires_grad_(False)
    return AmortisedExplainer(model, params, matched, loss_weights, history)
