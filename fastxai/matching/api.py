"""``activation_matching``: minimal binary masks whose masked image keeps the model's activations
and prediction (Suhail, Anand, Sethi 2025), by the stable area-ladder recipe (default,
:mod:`fastxai.matching.ladder`) or the authors' notebook recipe (:mod:`fastxai.matching.paper`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastxai._checks import warn_user
from fastxai._modes import keeps_buffers
from fastxai.explanation import Explanation
from fastxai.matching import ladder
from fastxai.matching.features import run_extractor
from fastxai.matching.losses import TERMS, LossWeights
from fastxai.matching.paper import check_batch, paper_activation_matching, prepare_targets
from fastxai.matching.robustness import blurred

RECIPES = ("stable", "paper")
# The stable recipe scores candidate masks by the notebook's fidelity terms (CE 15, KL 5, act 10)
# divided by 15; the area is set by the ladder, and binary cell masks need no area, binarisation
# or TV prior.
STABLE_WEIGHTS = LossWeights(
    act=10 / 15, kl=5 / 15, ce=1.0, area=0.0, bin=0.0, tv=0.0, rob=0.0, nec=0.0
)
STABLE_TERMS = ladder.SCORED_TERMS
# "zero": the paper's e = m * x (the mean colour in normalised space); "blur": the dropped pixels
# show the image blurred (sigma 10 px at 224), the background of extremal perturbations.
BACKGROUNDS = ("zero", "blur")
BLUR_SIGMA_224 = 10.0


@keeps_buffers
def activation_matching(
    model: nn.Module,
    x: Tensor,
    targets: int | Sequence[int] | Tensor | None = None,
    layers: Sequence[Any] | None = None,
    steps: int | None = None,
    weights: Any = None,
    *,
    recipe: str = "stable",
    **options: Any,
) -> Explanation:
    r"""Minimal binary masks ``m`` whose explanation :math:`e = m \odot x` keeps the model's
    activations and prediction (Activation Matching; Suhail, Anand, Sethi 2025).

    Both recipes minimise fidelity terms of the paper: :math:`L_{act} = \sum_\ell \alpha_\ell
    d_\ell(\varphi_\ell(x), \varphi_\ell(e))` over ``layers`` (default:
    :func:`fastxai.matching.features.default_layers`), :math:`L_{KL} = T^2 KL(\mathrm{softmax}
    (f(x)/T) \| \mathrm{softmax}(f(e)/T))` and :math:`L_{CE} = CE(f(e), y)`, with ``y`` the
    ``targets`` (default: the top-1 class of ``x``); the paper recipe adds the mask priors.

    ``recipe="stable"`` (default; :mod:`fastxai.matching.ladder`): greedy deletion of image cells
    (32 then 16 pixels at 224) scored by :math:`\lambda_{act} L_{act} + \lambda_{KL} L_{KL} +
    \lambda_{CE} L_{CE}` (``weights`` override :data:`STABLE_WEIGHTS`; the other terms must be
    0), and a ladder of areas (``areas``, default 5 / 10 / 15 / 20 / 30 % of the pixels) read off
    the deletion sequence. The result is, per image, the smallest area whose mask keeps ``y`` as
    the top-1 class of ``e`` with :math:`p_y(e) \ge` ``keep_ratio`` :math:`\cdot p_y(x)`
    (default ½). There is no seed: the mask depends on the model and the image only. Options:
    ``areas``, ``keep_ratio``, ``temperature`` (2), ``refine_below`` (0.3: the area below which
    cells are 16 px), ``delete_fraction`` (0.1 of the kept cells per round), ``batch_size``
    (32 candidates per forward), ``background`` (``"zero"``: the paper's :math:`e = m \odot x`;
    ``"blur"``: the dropped pixels show the image blurred, sigma 10 px at 224), ``progress``.
    Extras beside the common ones: ``area`` (the chosen area, NaN where none kept the class),
    ``found``, ``kept_sequence`` (the kept fraction after each deletion round) and ``ladder``
    (``areas``, and per image and area ``masks``, ``kept_fraction``, ``keeps_class``,
    ``top1_kept``, ``prob_e``). An image where no area keeps the class gets the largest area's
    mask, ``found`` False and a warning.

    ``recipe="paper"``: the authors' notebook (per-image U-Net from a seeded random start,
    straight-through threshold at ½, 880 Adam steps at 5e-5); see
    :func:`fastxai.matching.paper.paper_activation_matching` for its options (``restarts``,
    ``width``, ``depth``, ``generator_precision``, ...). Its mask depends on the seed.

    Returns an :class:`Explanation` with ``mask`` ``(N, H, W)`` bool, ``maps`` the same as float,
    and ``extras``: ``explanation`` (e), ``soft_mask`` (p; the mask itself for the stable
    recipe), ``kept_fraction``, ``top1_x``, ``top1_e``, ``top1_kept``, ``prob_x`` and ``prob_e``
    (softmax probability of ``y``), ``logits_e``, ``loss_history`` (term -> values per training
    step or deletion round, plus ``"total"``), ``layers``, ``weights``, ``recipe``.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if recipe == "paper":
        if steps is not None:
            options["steps"] = steps
        explanation = paper_activation_matching(
            model, x, targets, layers, weights=weights, **options
        )
        explanation.extras["recipe"] = "paper"
        return explanation
    unknown = set(options) - set(STABLE_OPTIONS)
    if unknown:
        raise TypeError(
            f"activation_matching: {sorted(unknown)} are not options of recipe='stable' "
            f"(its options: {sorted(STABLE_OPTIONS)}); recipe='paper' has its own"
        )
    if steps is not None:
        raise TypeError("steps: recipe='stable' has no training steps (it deletes cells)")
    return stable_activation_matching(model, x, targets, layers, weights, **options)


def check_ladder_options(
    areas: Sequence[float],
    keep_ratio: float,
    refine_below: float,
    delete_fraction: float,
    batch_size: int,
) -> None:
    if isinstance(areas, (str, bytes)) or not isinstance(areas, Sequence) or not areas:
        raise ValueError(f"areas: expected a non-empty sequence of fractions, got {areas!r}")
    if any(not isinstance(a, (int, float)) or not 0 < a <= 1 for a in areas):
        raise ValueError(f"areas: every area must be a fraction in (0, 1], got {list(areas)}")
    if list(areas) != sorted(set(areas)):
        raise ValueError(f"areas: expected distinct areas in increasing order, got {list(areas)}")
    for name, value in (
        ("keep_ratio", keep_ratio),
        ("refine_below", refine_below),
        ("delete_fraction", delete_fraction),
    ):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")


def stable_activation_matching(
    model: nn.Module,
    x: Tensor,
    targets: int | Sequence[int] | Tensor | None = None,
    layers: Sequence[Any] | None = None,
    weights: Any = None,
    *,
    areas: Sequence[float] = ladder.DEFAULT_AREAS,
    keep_ratio: float = ladder.DEFAULT_KEEP_RATIO,
    temperature: float = 2.0,
    refine_below: float = ladder.DEFAULT_REFINE_BELOW,
    delete_fraction: float = ladder.DEFAULT_DELETE_FRACTION,
    batch_size: int = ladder.DEFAULT_BATCH_SIZE,
    background: str = "zero",
    progress: bool = True,
) -> Explanation:
    """The stable recipe of :func:`activation_matching` (see there and
    :mod:`fastxai.matching.ladder`)."""
    check_batch(model, x)
    check_ladder_options(areas, keep_ratio, refine_below, delete_fraction, batch_size)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    loss_weights = LossWeights.from_any(weights, STABLE_WEIGHTS)
    unused = [t for t in TERMS if t not in STABLE_TERMS and getattr(loss_weights, t) > 0]
    if unused:
        raise ValueError(
            f"weights: recipe='stable' scores masks by {list(STABLE_TERMS)} only; "
            f"{unused} must be 0 (they are terms of recipe='paper')"
        )

    images = x.detach()
    matched, extractor, target_logits, target_features, labels = prepare_targets(
        model, images, layers, targets
    )
    config = ladder.ScoreConfig(
        layer_weights=tuple(layer.weight for layer in matched),
        distances=tuple(layer.distance for layer in matched),
        temperature=float(temperature),
        act=loss_weights.act,
        kl=loss_weights.kl,
        ce=loss_weights.ce,
    )
    with torch.no_grad():
        sigma = BLUR_SIGMA_224 * min(images.shape[-2:]) / 224
        backdrop = blurred(images, sigma) if background == "blur" else None
        result = ladder.greedy_deletion(
            extractor,
            images,
            target_logits,
            target_features,
            labels,
            config,
            smallest_area=float(areas[0]),
            refine_below=float(refine_below),
            delete_fraction=float(delete_fraction),
            batch_size=batch_size,
            background=backdrop,
            progress=progress,
        )
        return finish_ladder(
            extractor,
            result,
            images,
            torch.tensor([float(a) for a in areas]),
            target_logits,
            labels,
            keep_ratio,
            loss_weights,
            matched,
            backdrop,
        )


def finish_ladder(
    extractor: nn.Module,
    result: ladder.DeletionResult,
    images: Tensor,
    areas: Tensor,
    target_logits: Tensor,
    labels: Tensor,
    keep_ratio: float,
    loss_weights: LossWeights,
    matched: list,
    background: Tensor | None = None,
) -> Explanation:
    """The rungs' masks, one forward of their explanations, the selection of the smallest rung
    that keeps the class, and the :class:`Explanation`."""
    n, rungs = images.shape[0], areas.numel()
    device = images.device
    steps = ladder.ladder_rungs(result, areas)  # (N, A)
    sequence = torch.stack(result.masks)  # (S, N, H, W)
    rung_masks = sequence[steps, torch.arange(n, device=device)[:, None]]  # (N, A, H, W)
    flat_masks = rung_masks.flatten(0, 1)
    explanations = ladder.compose(
        flat_masks,
        images.repeat_interleave(rungs, 0),
        None if background is None else background.repeat_interleave(rungs, 0),
    )
    logits_e, _ = run_extractor(extractor, explanations)
    prob_x = F.softmax(target_logits, 1).gather(1, labels[:, None])[:, 0]
    per_rung_labels = labels.repeat_interleave(rungs)[:, None]
    prob_rungs = F.softmax(logits_e, 1).gather(1, per_rung_labels)[:, 0].view(n, rungs)
    top1_rungs = logits_e.argmax(1).view(n, rungs)
    keeps = (top1_rungs == labels[:, None]) & (prob_rungs >= keep_ratio * prob_x[:, None])
    found = keeps.any(1)
    # the first rung that keeps the class, else the largest
    chosen = torch.where(found, keeps.int().argmax(1), torch.full_like(labels, rungs - 1))
    rows = torch.arange(n, device=device) * rungs + chosen
    for i in (~found).nonzero()[:, 0].tolist():
        warn_user(
            f"activation_matching: image {i}: no area up to {100 * float(areas[-1]):g} % keeps "
            f"class {int(labels[i])} with p(e) >= {keep_ratio:g} p(x); its mask is the largest "
            "area's and does not keep it (pass larger areas=...)"
        )
    mask = flat_masks[rows]
    kept_rungs = flat_masks.flatten(1).float().mean(1).view(n, rungs)
    history = result.terms[1:].float()  # (rounds, N, 3); row 0 of terms is the full image
    terms = {term: history[..., i] for i, term in enumerate(STABLE_TERMS)}
    weights = torch.tensor([getattr(loss_weights, t) for t in STABLE_TERMS])
    terms["total"] = (history * weights.to(history.device)).sum(-1)
    top1_x = target_logits.argmax(1)
    top1_e = top1_rungs.gather(1, chosen[:, None])[:, 0]
    return Explanation(
        maps=mask.to(torch.float64 if images.dtype == torch.float64 else torch.float32),
        targets=labels,
        logits=target_logits,
        mask=mask,
        extras={
            "explanation": explanations[rows],
            "soft_mask": mask.to(images.dtype),
            "kept_fraction": kept_rungs.gather(1, chosen[:, None])[:, 0],
            "area": torch.where(found, areas.to(device)[chosen], float("nan")),
            "found": found,
            "top1_x": top1_x,
            "top1_e": top1_e,
            "top1_kept": top1_e == top1_x,
            "prob_x": prob_x,
            "prob_e": prob_rungs.gather(1, chosen[:, None])[:, 0],
            "logits_e": logits_e.view(n, rungs, -1)[torch.arange(n, device=device), chosen],
            "ladder": {
                "areas": areas.float(),
                "kept_fraction": kept_rungs,
                "top1_kept": top1_rungs == top1_x[:, None],
                "keeps_class": keeps,
                "prob_e": prob_rungs,
                "masks": rung_masks,
            },
            "kept_sequence": result.kept,
            "loss_history": terms,
            "layers": matched,
            "weights": loss_weights,
            "recipe": "stable",
        },
    )


STABLE_OPTIONS = (
    "areas",
    "background",
    "keep_ratio",
    "temperature",
    "refine_below",
    "delete_fraction",
    "batch_size",
    "progress",
)
