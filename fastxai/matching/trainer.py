"""One Activation Matching step for many images at once, and the training loop around it.

Per step: generator forward -> ``p = sigmoid`` -> straight-through hard mask ``m`` -> the batch
``[e_1..e_N, e~_{1,1}..e~_{N,K}, (x_c)]`` through the classifier in one forward -> per-image
terms ``(N, T)``. The step function is compiled with ``torch.compile(fullgraph=True)`` (on first
use: compiling at import would load TorchDynamo into every ``import fastxai``); its result's
``.backward()`` runs outside, so AOTAutograd compiles the backward too. The targets ``phi(x)``
and ``f(x)`` are computed once, before the loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastxai.matching.features import run_extractor
from fastxai.matching.generator import GeneratorParams, generator_logits, straight_through_mask
from fastxai.matching.losses import (
    TERMS,
    activation_loss,
    ce_loss,
    kl_loss,
    mask_prior_losses,
    necessity_loss,
)

BACKGROUNDS = ("normal", "uniform", "zeros")


@dataclass(frozen=True)
class StepConfig:
    """The static (compile-time) settings of a step."""

    layer_weights: tuple[float, ...]
    distances: tuple[str, ...]
    temperature: float
    neighbours: int
    with_necessity: bool
    # Autocast dtype of the generator (e.g. torch.bfloat16), or None for the input's dtype.
    generator_autocast: torch.dtype | None = None


def mask_logits(params: GeneratorParams, x: Tensor, autocast: torch.dtype | None = None) -> Tensor:
    """The U-Nets' mask logits ``(N, 1, H, W)`` of the images ``x``, under ``autocast`` when
    given."""
    if autocast is None:
        return generator_logits(params, x)
    with torch.autocast(x.device.type, dtype=autocast):
        return generator_logits(params, x)


def step_terms(
    params: GeneratorParams,
    x: Tensor,
    noise: Tensor,
    target_logits: Tensor,
    target_features: list[Tensor],
    labels: Tensor,
    weights: Tensor,
    extractor: nn.Module,
    config: StepConfig,
) -> tuple[Tensor, Tensor]:
    """Total loss (summed over images) and the per-image terms ``(N, len(TERMS))``.

    ``noise`` ``(N, K, C, H, W)`` holds the backgrounds ``r_k`` of
    :math:`\\tilde e_k = m \\odot x + (1 - m) \\odot r_k`.
    """
    n, k = noise.shape[:2]
    logits_mask = mask_logits(params, x, config.generator_autocast)
    p = torch.sigmoid(logits_mask.to(x.dtype))
    m = straight_through_mask(p)
    e = m * x
    parts = [e]
    if k:
        kept = (m * x)[:, None]
        parts.append((kept + (1 - m[:, None]) * noise).flatten(0, 1))
    if config.with_necessity:
        parts.append((1 - m) * x)
    logits, features = run_extractor(extractor, torch.cat(parts) if len(parts) > 1 else e)
    explanation_logits = logits[:n]
    act = activation_loss(
        target_features,
        [f[:n] for f in features],
        list(config.layer_weights),
        list(config.distances),
    )
    kl = kl_loss(target_logits, explanation_logits, config.temperature)
    ce = ce_loss(explanation_logits, labels)
    priors = mask_prior_losses(p, config.neighbours)
    zeros = act.new_zeros(n)
    rob = (
        ce_loss(logits[n : n * (1 + k)], labels.repeat_interleave(k)).view(n, k).mean(1)
        if k
        else zeros
    )
    nec = (
        necessity_loss(target_logits, logits[n * (1 + k) :], labels)
        if config.with_necessity
        else zeros
    )
    terms = torch.stack([act, kl, ce, priors[:, 0], priors[:, 1], priors[:, 2], rob, nec], 1)
    return (terms * weights).sum(), terms.detach()


@functools.cache
def compiled_step_terms() -> Callable[..., tuple[Tensor, Tensor]]:
    """:func:`step_terms` through ``torch.compile(fullgraph=True)``, made once per process."""
    return torch.compile(step_terms, fullgraph=True, dynamic=False)


def sample_backgrounds(
    backgrounds: Sequence[str], like: Tensor, generators: Sequence[torch.Generator]
) -> Tensor:
    """``(N, K, C, H, W)``: background ``k`` of image ``n`` drawn from ``generators[n]``
    (``normal``: N(0, 1), ``uniform``: U(-1, 1), ``zeros``: 0, all in normalised space)."""
    per_image = []
    for gen in generators:
        per_bg = []
        for kind in backgrounds:
            if kind == "normal":
                per_bg.append(
                    torch.randn(like.shape[1:], generator=gen, device=like.device, dtype=like.dtype)
                )
            elif kind == "uniform":
                per_bg.append(
                    torch.rand(like.shape[1:], generator=gen, device=like.device, dtype=like.dtype)
                    * 2
                    - 1
                )
            else:
                per_bg.append(like.new_zeros(like.shape[1:]))
        per_image.append(torch.stack(per_bg) if per_bg else like.new_zeros((0, *like.shape[1:])))
    return torch.stack(per_image)


@dataclass
class TrainResult:
    """What :func:`train_generators` returns: the trained weights and ``(steps, N, T)`` terms."""

    params: GeneratorParams
    history: Tensor


def first_non_finite(history: Tensor, start: int, stop: int) -> tuple[int, int, str] | None:
    """``(step, image, term)`` of the first NaN or Inf in ``history[start:stop]``, else None."""
    window = history[start:stop]
    bad = ~torch.isfinite(window)
    if not bool(bad.any()):
        return None
    step, image, term = (int(i) for i in bad.nonzero()[0])
    return start + step, image, TERMS[term]


def train_generators(
    params: GeneratorParams,
    x: Tensor,
    target_logits: Tensor,
    target_features: list[Tensor],
    labels: Tensor,
    weights: Tensor,
    extractor: nn.Module,
    config: StepConfig,
    *,
    steps: int,
    lr: float,
    backgrounds: Sequence[str],
    seeds: Sequence[int],
    compile: bool,
    progress: bool,
    restarts: int = 1,
) -> TrainResult:
    """Adam on every generator's weights for ``steps`` steps; a NaN or Inf in any term stops
    with a :class:`FloatingPointError` naming the term, the step and the image (generator ``g``
    is restart ``g % restarts`` of image ``g // restarts``)."""
    from tqdm.auto import tqdm

    for t in params.values():
        t.requires_grad_(True)
    optimiser = torch.optim.Adam(list(params.values()), lr=lr)
    generators = [torch.Generator(device=x.device).manual_seed(int(s)) for s in seeds]
    step_fn = compiled_step_terms() if compile else step_terms
    history = x.new_empty((steps, x.shape[0], len(TERMS)), dtype=torch.float32)
    # A host sync per check: every step on the CPU (free), every 25 steps on accelerators.
    check_every = 1 if x.device.type == "cpu" else 25
    checked = 0
    bar = tqdm(range(steps), desc="activation matching", disable=not progress, leave=False)
    for step in bar:
        noise = sample_backgrounds(backgrounds, x, generators)
        total, terms = step_fn(
            params, x, noise, target_logits, target_features, labels, weights, extractor, config
        )
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        history[step] = terms
        if (step + 1) % check_every == 0 or step + 1 == steps:
            if (bad := first_non_finite(history, checked, step + 1)) is not None:
                at, run, term = bad
                where = f"image {run // restarts}" + (
                    f", restart {run % restarts}" if restarts > 1 else ""
                )
                raise FloatingPointError(
                    f"activation_matching: the {term!r} loss term is not finite at step {at} "
                    f"({where}); lower the learning rate or that term's weight"
                )
            checked = step + 1
            if progress:
                bar.set_postfix(loss=f"{float((terms * weights).sum(1).mean()):.4g}")
        optimiser.step()
    for t in params.values():
        t.requires_grad_(False)
    return TrainResult(params, history)
