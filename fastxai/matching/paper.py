"""The paper recipe of ``activation_matching`` (``recipe="paper"``): the authors' notebook, one
U-Net mask generator per image trained from a seeded random start with a straight-through threshold
(Suhail, Anand, Sethi 2025). Its mask depends on the seed; the default recipe is
:mod:`fastxai.matching.ladder`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastxai._checks import check_images, check_model
from fastxai.explanation import Explanation
from fastxai.matching.features import (
    STANDARDISED_MSE,
    MatchedLayer,
    feature_extractor,
    normalise_layers,
    run_extractor,
)
from fastxai.matching.generator import (
    GeneratorParams,
    init_generator_params,
)
from fastxai.matching.losses import TERMS, LossWeights
from fastxai.matching.trainer import BACKGROUNDS, StepConfig, mask_logits, train_generators
from fastxai.targets import resolve_targets

DEFAULT_STEPS = 880
DEFAULT_LR = 5e-5
DEFAULT_SEED = 0
# Restart r of an image with seed s starts from seed s + r * RESTART_SEED_STRIDE.
RESTART_SEED_STRIDE = 100_003
# The restart kept is the one with the lowest weighted loss, averaged over its last steps.
RESTART_LOSS_STEPS = 10


def check_options(
    x: Tensor,
    steps: int,
    lr: float,
    temperature: float,
    neighbours: int,
    backgrounds: Sequence[str],
    width: int,
    depth: int,
    seed: int,
) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if neighbours not in (4, 8):
        raise ValueError(f"neighbours must be 4 or 8, got {neighbours!r}")
    if isinstance(backgrounds, str) or any(b not in BACKGROUNDS for b in backgrounds):
        raise ValueError(f"backgrounds must be a sequence of {BACKGROUNDS}, got {backgrounds!r}")
    if not isinstance(width, int) or width < 1 or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"width must be an int >= 1 and depth an int >= 0, got {width}, {depth}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")


def per_image_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """``seed + i`` for image ``i``, or the given sequence of ``n`` seeds."""
    if isinstance(seed, Sequence) and not isinstance(seed, str):
        seeds = list(seed)
        if len(seeds) != n or any(not isinstance(s, int) or isinstance(s, bool) for s in seeds):
            raise ValueError(f"seed: expected an int or {n} ints (one per image), got {seed!r}")
        return seeds
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int or a sequence of ints, got {type(seed).__name__}")
    return [seed + i for i in range(n)]


def per_image_weights(weights: object, n: int) -> LossWeights | list[LossWeights]:
    """One :class:`LossWeights` for every image, or a list of ``n`` (one per image)."""
    if isinstance(weights, Sequence) and not isinstance(weights, str):
        if len(weights) != n:
            raise ValueError(
                f"weights: a sequence needs one entry per image ({n}), got {len(weights)}"
            )
        return [LossWeights.from_any(w) for w in weights]
    return LossWeights.from_any(weights)


def weights_tensor(weights: LossWeights | list[LossWeights], like: Tensor) -> Tensor:
    """``(T,)`` for one weight set, ``(N, T)`` for one per image; in :data:`TERMS` order."""
    if isinstance(weights, list):
        return torch.stack([w.as_tensor(like) for w in weights])
    return weights.as_tensor(like)


@torch.no_grad()
def compute_targets(
    extractor: nn.Module, x: Tensor, layers: list[MatchedLayer]
) -> tuple[Tensor, list[Tensor]]:
    logits, features = run_extractor(extractor, x)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits of shape (N, num_classes), got {shape}")
    for layer, feature in zip(layers, features, strict=True):
        if feature.dim() != 4:
            raise ValueError(
                f"layers: {layer.name!r} yields {tuple(feature.shape)}; activation matching "
                "needs (N, C, h, w) feature maps"
            )
        if layer.distance == STANDARDISED_MSE and feature.shape[-2] * feature.shape[-1] < 2:
            raise ValueError(
                f"layers: {layer.name!r} is 1x1; its standardised MSE is undefined, use 'cosine'"
            )
    return logits, features


def check_batch(model: nn.Module, x: Tensor) -> None:
    """The model and images checks every recipe makes, and a non-empty batch."""
    check_model(model)
    check_images(model, x)
    if x.shape[0] == 0:
        raise ValueError("x: expected at least one image, got an empty batch")


class Targets(NamedTuple):
    """What every recipe matches: the layers, the traced classifier, ``f(x)``, the layers'
    activations of ``x`` and the explained classes."""

    matched: list[MatchedLayer]
    extractor: nn.Module
    logits: Tensor
    features: list[Tensor]
    labels: Tensor


def prepare_targets(model: nn.Module, images: Tensor, layers: object, targets: object) -> Targets:
    """The :class:`Targets` of ``images`` (detached) for ``layers`` and ``targets`` (class
    indices; callables are refused)."""
    matched = normalise_layers(model, images, layers)
    extractor = feature_extractor(model, [layer.name for layer in matched])
    target_logits, target_features = compute_targets(extractor, images, matched)
    if callable(targets) or (isinstance(targets, Sequence) and any(callable(t) for t in targets)):
        raise TypeError("targets: activation_matching needs class indices, not callables")
    labels = resolve_targets(targets, target_logits).classes
    return Targets(matched, extractor, target_logits, target_features, labels)


def paper_activation_matching(
    model: nn.Module,
    x: Tensor,
    targets: int | Sequence[int] | Tensor | None = None,
    layers: Sequence[Any] | None = None,
    steps: int = DEFAULT_STEPS,
    weights: LossWeights
    | dict[str, float]
    | Sequence[LossWeights | dict[str, float]]
    | None = None,
    *,
    seed: int | Sequence[int] = DEFAULT_SEED,
    progress: bool = True,
    lr: float = DEFAULT_LR,
    temperature: float = 2.0,
    neighbours: int = 4,
    backgrounds: Sequence[str] = ("normal",),
    width: int = 32,
    depth: int = 4,
    compile: bool = True,
    generator_precision: str = "float32",
    restarts: int = 1,
    keep: str = "loss",
) -> Explanation:
    r"""The paper recipe of :func:`fastxai.activation_matching` (``recipe="paper"``): minimal
    binary masks ``m`` whose explanation :math:`e = m \odot x` keeps the model's activations and
    prediction, by the authors' notebook.

    Each image gets its own U-Net mask generator (width ``width``, depth ``depth``), trained
    from scratch with Adam (``lr``) for ``steps`` steps on
    :math:`L = \lambda_{act} L_{act} + \lambda_{KL} L_{KL} + \lambda_{CE} L_{CE}
    + \lambda_{area} \overline{p} + \lambda_{bin} \overline{p(1-p)} + \lambda_{tv} TV(p)
    + \lambda_{rob} L_{rob} + \lambda_{nec} L_{nec}`, with :math:`p = \sigma(\mathrm{U\text{-}Net}
    (x))`, the hard mask :math:`m = 1[p > 0.5]` (straight-through gradient), and

    * :math:`L_{act} = \sum_\ell \alpha_\ell d_\ell(\varphi_\ell(x), \varphi_\ell(e))` over
      ``layers`` (default: :func:`fastxai.matching.features.default_layers`);
    * :math:`L_{KL} = T^2 KL(\mathrm{softmax}(f(x)/T) \| \mathrm{softmax}(f(e)/T))`,
      ``T = temperature``; :math:`L_{CE} = CE(f(e), y)`;
    * :math:`L_{rob} = \mathrm{mean}_k CE(f(m \odot x + (1-m) \odot r_k), y)` over
      ``backgrounds`` (fresh noise each step);
      :math:`L_{nec} = \max(0, 1 - (z_y(x) - z_y((1-m) \odot x)))`;
    * TV: mean-reduced L1, 4-neighbour (``neighbours=8``: diagonals weighted :math:`1/\sqrt2`).

    ``y`` is ``targets`` (class indices) or, by default, the top-1 class of ``x``.
    ``weights``: :class:`LossWeights` or a dict overriding some of its defaults, or a sequence of
    those, one per image (e.g. a weight sweep: the same photo repeated, one weight set each).
    Image ``n`` uses seed ``seed + n`` (its generator's initial weights and its noise), so a batch
    gives the same masks as explaining its images one by one; ``seed`` may also be a sequence of
    one seed per image (repeat a seed to give copies of a photo the same start and noise).
    ``compile`` runs the step through ``torch.compile(fullgraph=True)`` (the first call
    compiles, 10-40 s on a CPU).
    ``generator_precision="bfloat16"`` runs the U-Net under autocast (1.6x faster on a CPU with
    AVX512-BF16; the classifier and the loss stay in the input's dtype); masks differ slightly
    from the float32 default where ``p`` is near 0.5.

    ``restarts``: train that many generators per image (restart ``r`` from seed
    ``seed_n + r * 100003``, all in the same batched steps) and keep, per image, one of them:
    ``keep="loss"`` the lowest weighted loss over its last 10 steps (the objective's choice);
    ``keep="smallest"`` the mask with the fewest kept pixels among those whose ``e`` keeps the
    top-1 class of ``x`` (the lowest loss when none does). The objective is not convex and on
    real classifiers different seeds end in minima of very different size
    (benchmarks/README.md); ``extras["restart_losses"]``, ``extras["restart_kept_fraction"]``
    and ``extras["restart_top1_kept"]`` (each ``(N, restarts)``) and ``extras["restart_kept"]``
    (the index chosen) say how far apart they ended.

    Returns an :class:`Explanation` with ``mask`` ``(N, H, W)`` bool, ``maps`` the same as float,
    and ``extras``: ``explanation`` (e), ``soft_mask`` (p), ``kept_fraction``, ``top1_x``,
    ``top1_e``, ``top1_kept``, ``prob_x`` and ``prob_e`` (softmax probability of ``y``),
    ``loss_history`` (term -> ``(steps, N)``, plus ``"total"``), ``layers``, ``weights`` (as
    given: one :class:`LossWeights`, or a list of them).
    """
    check_batch(model, x)
    n = x.shape[0]
    seeds = per_image_seeds(seed, n)
    check_options(x, steps, lr, temperature, neighbours, backgrounds, width, depth, seeds[0])
    precisions = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if generator_precision not in precisions:
        raise ValueError(
            f"generator_precision must be one of {list(precisions)}, got {generator_precision!r}"
        )
    if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")
    if keep not in ("loss", "smallest"):
        raise ValueError(f"keep must be 'loss' or 'smallest', got {keep!r}")
    loss_weights = per_image_weights(weights, n)
    images = x.detach()
    matched, extractor, target_logits, target_features, labels = prepare_targets(
        model, images, layers, targets
    )

    # restart r of image i is run i * restarts + r
    run_seeds = [s + r * RESTART_SEED_STRIDE for s in seeds for r in range(restarts)]
    run_weights = (
        [w for w in loss_weights for _ in range(restarts)]
        if isinstance(loss_weights, list)
        else loss_weights
    )

    def per_run(t: Tensor) -> Tensor:
        return t.repeat_interleave(restarts, 0) if restarts > 1 else t

    params = init_generator_params(
        run_seeds,
        in_channels=images.shape[1],
        width=width,
        depth=depth,
        device=images.device,
        dtype=images.dtype,
    )
    config = StepConfig(
        layer_weights=tuple(layer.weight for layer in matched),
        distances=tuple(layer.distance for layer in matched),
        temperature=float(temperature),
        neighbours=neighbours,
        with_necessity=any(w.nec > 0 for w in loss_weights)
        if isinstance(loss_weights, list)
        else loss_weights.nec > 0,
        generator_autocast=precisions[generator_precision],
    )
    run_weight_tensor = weights_tensor(run_weights, images)
    result = train_generators(
        params,
        per_run(images),
        per_run(target_logits),
        [per_run(f) for f in target_features],
        per_run(labels),
        run_weight_tensor,
        extractor,
        config,
        steps=steps,
        lr=lr,
        backgrounds=tuple(backgrounds),
        seeds=run_seeds,
        compile=compile,
        progress=progress,
        restarts=restarts,
    )
    kept_params, history = result.params, result.history
    restart_extras: dict[str, Tensor] = {}
    if restarts > 1:
        final = (result.history[-RESTART_LOSS_STEPS:] * run_weight_tensor.float()).sum(2).mean(0)
        final = final.view(n, restarts)
        every = finish_explanation(
            extractor,
            result.params,
            per_run(images),
            per_run(target_logits),
            per_run(labels),
            result.history,
            run_weights,
            matched,
            config.generator_autocast,
        ).extras
        kept_fraction = every["kept_fraction"].view(n, restarts)
        top1_kept = every["top1_kept"].view(n, restarts)
        best = final.argmin(1)
        if keep == "smallest":
            size = kept_fraction.masked_fill(~top1_kept, float("inf"))
            best = torch.where(top1_kept.any(1), size.argmin(1), best)
        runs = torch.arange(n, device=best.device) * restarts + best
        kept_params = {name: t[runs.to(t.device)] for name, t in result.params.items()}
        history = result.history[:, runs.to(history.device)]
        restart_extras = {
            "restart_losses": final,
            "restart_kept_fraction": kept_fraction,
            "restart_top1_kept": top1_kept,
            "restart_kept": best,
        }
    explanation = finish_explanation(
        extractor,
        kept_params,
        images,
        target_logits,
        labels,
        history,
        loss_weights,
        matched,
        config.generator_autocast,
    )
    explanation.extras.update(restart_extras)
    return explanation


@torch.no_grad()
def finish_explanation(
    extractor: nn.Module,
    params: GeneratorParams,
    images: Tensor,
    target_logits: Tensor,
    labels: Tensor,
    history: Tensor,
    loss_weights: LossWeights | list[LossWeights],
    matched: list[MatchedLayer],
    generator_autocast: torch.dtype | None,
) -> Explanation:
    """The final hard masks ``1[p > 0.5]`` of trained generators (:func:`mask_logits`),
    ``e = m * x`` and one forward of ``e``:
    the :class:`Explanation` of :func:`activation_matching`."""
    weight_tensor = weights_tensor(loss_weights, images)
    final_logits = mask_logits(params, images, generator_autocast)
    soft = torch.sigmoid(final_logits.to(images.dtype))[:, 0]
    mask = soft > 0.5
    explanation = mask[:, None].to(images.dtype) * images
    logits_e, _ = run_extractor(extractor, explanation)
    prob_x = F.softmax(target_logits, 1).gather(1, labels[:, None])[:, 0]
    prob_e = F.softmax(logits_e, 1).gather(1, labels[:, None])[:, 0]
    top1_x, top1_e = target_logits.argmax(1), logits_e.argmax(1)
    terms = {term: history[:, :, i] for i, term in enumerate(TERMS)}
    terms["total"] = (history * weight_tensor.float()).sum(2)
    return Explanation(
        maps=mask.to(torch.float64 if images.dtype == torch.float64 else torch.float32),
        targets=labels,
        logits=target_logits,
        mask=mask,
        extras={
            "explanation": explanation,
            "soft_mask": soft,
            "kept_fraction": mask.flatten(1).float().mean(1),
            "top1_x": top1_x,
            "top1_e": top1_e,
            "top1_kept": top1_e == top1_x,
            "prob_x": prob_x,
            "prob_e": prob_e,
            "logits_e": logits_e,
            "loss_history": terms,
            "layers": matched,
            "weights": loss_weights,
        },
    )
