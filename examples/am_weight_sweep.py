"""Retune lambda_rob and lambda_tv of Activation Matching on the demo's photos.

Every (photo, seed, weights) triple gets its own generator, all trained together in one batched
``fastxai.activation_matching`` call (per-image weights and seeds): the runs of one photo and seed
share the generator's initial weights and the noise backgrounds, so the weights are the only
difference between them. Per pair it prints the kept-pixel fraction, whether
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
from fastxai.matching import LossWeights, activation_matching
from fastxai.models import class_name, load_efficientnet_lite0

ROBUSTNESS_BACKGROUNDS = 16


# The CVPR text's weights for EfficientNet, ConvNeXt and MobileNet.
CVPR_EFFICIENTNET = {"act": 1.0, "ce": 4.0, "kl": 0.4, "area": 15, "bin": 0.3, "tv": 15, "rob": 6}


def parse_weights(text: str) -> LossWeights:
    """``"rob=15,tv=1000"`` -> the default weights with those overridden; ``"defaults"``;
    ``"cvpr"`` (:data:`CVPR_EFFICIENTNET`, optionally followed by overrides: ``"cvpr,tv=30"``)."""
    base: dict[str, float] = {}
    items = [kv for kv in text.split(",") if kv and kv != "defaults"]
    if items and items[0] == "cvpr":
        base, items = dict(CVPR_EFFICIENTNET), items[1:]
    base.update({k: float(v) for k, v in (kv.split("=") for kv in items)})
    return LossWeights.from_any(base)


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
        help="weight overrides, one generator each (default weights otherwise); 'defaults' for "
        "none, 'cvpr' for the CVPR text's EfficientNet weights",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1.5e-4)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="photo p uses seed + p, for each seed"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="cache the masks here; a rerun reuses them")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_efficientnet_lite0()
    model = loaded.model
    configs = [parse_weights(c) for c in args.configs]
    photos = torch.cat([loaded.preprocess(load_photo(p)) for p in args.photos])
    # photo-major, then seed, then weights: generator i is (photo, seed, config)
    runs = [
        (p, seed, c)
        for p in range(len(args.photos))
        for seed in args.seeds
        for c in range(len(configs))
    ]
    images = photos[[p for p, _, _ in runs]]

    name = f"sweep-{args.steps}-{args.lr:g}-{'_'.join(map(str, args.seeds))}.pt"
    cache = args.out / name if args.out else None
    if cache is not None and cache.exists():
        saved = torch.load(cache)
        mask, labels, total, wall = saved["mask"], saved["labels"], saved["total"], saved["s"]
        with torch.no_grad():
            logits_e = model(mask[:, None].float() * images)
    else:
        wall = time.perf_counter()
        ex = activation_matching(
            model,
            images,
            recipe="paper",
            steps=args.steps,
            lr=args.lr,
            weights=[configs[c] for _, _, c in runs],
            seed=[seed + p for p, seed, _ in runs],
        )
        wall = time.perf_counter() - wall
        mask, labels, logits_e = ex.mask, ex.targets, ex.extras["logits_e"]
        total = ex.extras["loss_history"]["total"]
        if cache is not None:
            atomic_save(
                {"mask": mask, "labels": labels, "total": total, "s": wall, "args": vars(args)},
                cache,
            )
    robust, robust_p = robustness(model, images, mask, labels, 1000)
    prob_e = F.softmax(logits_e, 1).gather(1, labels[:, None])[:, 0]
    print(
        f"EfficientNet-Lite0, {len(images)} generators together, {args.steps} steps, lr "
        f"{args.lr:g}: {wall:.0f} s ({wall / len(images):.0f} s per generator), "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}"
    )
    print(
        "| photo | seed | weights | kept | top-1 kept | p(e) | robust top-1 | robust p "
        "| boundary px | pieces | loss first -> last |\n" + "|---" * 11 + "|"
    )
    defaults = dataclasses.asdict(LossWeights())
    for i, (p, seed, c) in enumerate(runs):
        changed = {k: v for k, v in dataclasses.asdict(configs[c]).items() if v != defaults[k]}
        label = ", ".join(f"{k} {v:g}" for k, v in changed.items()) or "defaults"
        boundary, pieces = mask_shape_stats(mask[i].numpy())
        top1_kept = bool(logits_e[i].argmax() == labels[i])
        print(
            f"| {args.photos[p]} ({class_name(loaded.class_names, int(labels[i]))}) | {seed} "
            f"| {label} | {100 * mask[i].float().mean():.1f}% | {'yes' if top1_kept else 'no'} "
            f"| {prob_e[i]:.3f} | {100 * robust[i]:.0f}% | {robust_p[i]:.3f} | {boundary} "
            f"| {pieces} | {total[0, i]:.1f} -> {total[-1, i]:.1f} |"
        )


if __name__ == "__main__":
    main()
