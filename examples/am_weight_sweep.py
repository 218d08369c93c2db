"""Retune lambda_rob and lambda_tv of Activation Matching on the demo's photos (SPEC.md §C.4).

Every (photo, weights) pair gets its own generator, all trained together in one batched run: the
pairs of one photo share the generator's initial weights and the noise backgrounds, so the
weights are the only difference between them. Per pair it prints the kept-pixel fraction, whether
the top-1 class survives, the class probability on e = m * x, robustness (the share of 16 fresh
N(0, 1) backgrounds r with top-1 of m * x + (1 - m) * r unchanged, and their mean probability),
the 4-neighbour boundary length of the mask (TV, in pixels) and its number of connected pieces.

    .venv/bin/python examples/am_weight_sweep.py --steps 300 --lr 1.5e-4 --out /tmp/am-sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from fastxai.demo import load_photo
from fastxai.io import atomic_save
from fastxai.matching.api import compute_targets, finish_explanation
from fastxai.matching.features import feature_extractor, normalise_layers
from fastxai.matching.generator import init_generator_params
from fastxai.matching.losses import LossWeights
from fastxai.matching.trainer import StepConfig, train_generators
from fastxai.models import class_name, load_efficientnet_lite0

ROBUSTNESS_BACKGROUNDS = 16


def parse_weights(text: str) -> LossWeights:
    """``"rob=15,tv=1000"`` -> the default weights with those overridden."""
    pairs = (kv.split("=") for kv in text.split(",") if kv)
    return LossWeights.from_any({k: float(v) for k, v in pairs})


@torch.no_grad()
def robustness(
    model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of backgrounds keeping the top-1, and the mean probability of ``labels``, over
    :data:`ROBUSTNESS_BACKGROUNDS` draws of ``m * x + (1 - m) * r``, ``r ~ N(0, 1)``."""
    gen = torch.Generator().manual_seed(seed)
    m = mask[:, None].to(x.dtype)
    kept, probs = [], []
    for _ in range(ROBUSTNESS_BACKGROUNDS):
        r = torch.randn(x.shape, generator=gen)
        logits = model(m * x + (1 - m) * r)
        kept.append(logits.argmax(1) == labels)
        probs.append(F.softmax(logits, 1).gather(1, labels[:, None])[:, 0])
    return torch.stack(kept).float().mean(0), torch.stack(probs).mean(0)


def mask_shape_stats(mask: np.ndarray) -> tuple[int, int]:
    """4-neighbour boundary length in pixels and the number of 8-connected pieces."""
    boundary = int(np.sum(mask[1:] != mask[:-1]) + np.sum(mask[:, 1:] != mask[:, :-1]))
    _, pieces = ndimage.label(mask, structure=np.ones((3, 3)))
    return boundary, int(pieces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs="+", default=["chelsea", "coffee"])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["rob=5", "rob=15", "rob=50", "rob=15,tv=500", "rob=15,tv=2000"],
        help="weight overrides, one generator each (default weights otherwise)",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1.5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="cache the masks here; a rerun reuses them")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_efficientnet_lite0()
    model = loaded.model
    configs = [parse_weights(c) for c in args.configs]
    photos = torch.cat([loaded.preprocess(load_photo(p)) for p in args.photos])
    images = photos.repeat_interleave(len(configs), 0)  # photo-major: (photo, config)
    weights = torch.stack([c.as_tensor(images) for c in configs]).repeat(len(args.photos), 1)
    seeds = [args.seed + p for p in range(len(args.photos)) for _ in configs]

    cache = args.out / f"sweep-{args.steps}-{args.lr:g}.pt" if args.out else None
    if cache is not None and cache.exists():
        saved = torch.load(cache)
        mask, labels, history, wall = saved["mask"], saved["labels"], saved["history"], saved["s"]
        with torch.no_grad():
            logits_e = model(mask[:, None].float() * images)
    else:
        matched = normalise_layers(model, images, None)
        extractor = feature_extractor(model, [layer.name for layer in matched])
        target_logits, target_features = compute_targets(extractor, images, matched)
        labels = target_logits.argmax(1)
        params = init_generator_params(seeds, in_channels=3, dtype=images.dtype)
        step = StepConfig(
            layer_weights=tuple(layer.weight for layer in matched),
            distances=tuple(layer.distance for layer in matched),
            temperature=2.0,
            neighbours=4,
            with_necessity=False,
        )
        wall = time.perf_counter()
        result = train_generators(
            params,
            images,
            target_logits,
            target_features,
            labels,
            weights,
            extractor,
            step,
            steps=args.steps,
            lr=args.lr,
            backgrounds=("normal",),
            seeds=seeds,
            compile=True,
            progress=True,
        )
        wall = time.perf_counter() - wall
        ex = finish_explanation(
            extractor, result.params, images, target_logits, labels, result.history,
            LossWeights(), matched, None,
        )  # fmt: skip
        mask, history, logits_e = ex.mask, result.history, ex.extras["logits_e"]
        if cache is not None:
            atomic_save(
                {"mask": mask, "labels": labels, "history": history, "s": wall, "args": vars(args)},
                cache,
            )
    robust, robust_p = robustness(model, images, mask, labels, args.seed + 1000)
    prob_e = F.softmax(logits_e, 1).gather(1, labels[:, None])[:, 0]
    total = (history * weights.float()).sum(2)
    print(
        f"EfficientNet-Lite0, {len(images)} generators together, {args.steps} steps, lr "
        f"{args.lr:g}: {wall:.0f} s ({wall / len(images):.0f} s per generator), "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}"
    )
    print(
        "| photo | weights | kept | top-1 kept | p(e) | robust top-1 | robust p | boundary px "
        "| pieces | loss first -> last |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    defaults = dataclasses.asdict(LossWeights())
    for i in range(len(images)):
        photo = args.photos[i // len(configs)]
        config = configs[i % len(configs)]
        changed = {k: v for k, v in dataclasses.asdict(config).items() if v != defaults[k]}
        label = ", ".join(f"{k} {v:g}" for k, v in changed.items()) or "defaults"
        boundary, pieces = mask_shape_stats(mask[i].numpy())
        top1_kept = bool(logits_e[i].argmax() == labels[i])
        print(
            f"| {photo} ({class_name(loaded.class_names, int(labels[i]))}) | {label} "
            f"| {100 * mask[i].float().mean():.1f}% | {'yes' if top1_kept else 'no'} "
            f"| {prob_e[i]:.3f} | {100 * robust[i]:.0f}% | {robust_p[i]:.3f} | {boundary} "
            f"| {pieces} | {total[0, i]:.1f} -> {total[-1, i]:.1f} |"
        )


if __name__ == "__main__":
    main()
