"""Amortised Activation Matching against per-image AM on held-out photos (EfficientNet-Lite0).

One generator (:func:`fastxai.matching.amortised.train_amortised`: by default the decoder of the
classifier's features, ``--generator unet`` for a U-Net on the pixels) is trained over random
square crops (with horizontal flips) of scikit-image photos that are not held out; it then
explains each held-out photo in one forward pass. Per-image AM
(:func:`fastxai.activation_matching`, default schedule: 880 steps at lr 5e-5, one call per
held-out photo) is the reference. The table gives,
per held-out photo, the kept-pixel fraction, whether the masked image keeps the photo's top-1
class, the mask IoU between the two methods and the seconds each took; the summary adds the
amortised generator's results on its own training crops (the train / held-out gap).

Results are cached in ``--out`` (per-image masks, amortised weights), so a rerun with the same
options only evaluates. At one thread on a shared 2-core CPU: about 26 minutes of amortised
training (the default 1500 steps of the feature decoder), 12 minutes of per-image AM per held-out
photo, 2 minutes of evaluation. Reproduce the reported runs (benchmarks/README.md: with the
area warm-up, then the defaults (lr 1e-4, no warm-up), then lr 1e-3 without it, then the U-Net):

    OMP_NUM_THREADS=1 .venv/bin/python examples/am_amortised.py --out /tmp/amort/run \
        --held-out chelsea coffee --lr 1e-3 --area-warmup 750
    OMP_NUM_THREADS=1 .venv/bin/python examples/am_amortised.py --out /tmp/amort/run \
        --held-out chelsea coffee [--lr 1e-3]
    OMP_NUM_THREADS=1 .venv/bin/python examples/am_amortised.py --out /tmp/amort/run \
        --held-out chelsea coffee --generator unet --lr 2e-4 --steps 260 --area-warmup 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastxai.demo import available_photos, load_photo
from fastxai.io import atomic_save
from fastxai.matching import TERMS, LossWeights, activation_matching
from fastxai.matching.amortised import GENERATORS, AmortisedExplainer, train_amortised
from fastxai.matching.features import normalise_layers
from fastxai.matching.paper import DEFAULT_LR, DEFAULT_STEPS
from fastxai.matching.present import am_summary
from fastxai.models import (
    LoadedModel,
    class_name,
    crop_and_resize,
    load_efficientnet_lite0,
    to_rgb_uint8,
)

HELD_OUT = ("chelsea", "coffee", "rocket")
# skimage.data images bundled with scikit-image (no download). "cat" is chelsea, so it is left out.
TRAIN_PHOTOS = (
    "astronaut",
    "stereo_motorcycle",
    "camera",
    "clock",
    "coins",
    "horse",
    "retina",
    "hubble_deep_field",
    "immunohistochemistry",
    "colorwheel",
    "cell",
    "grass",
    "gravel",
    "brick",
    "moon",
    "page",
    "text",
)
ALIASES = {"cat": "chelsea", "chelsea": "cat"}
MIN_CROP_AREA = 0.2  # smallest crop, as a fraction of the photo's largest square


def skimage_photo(name: str) -> np.ndarray:
    """``skimage.data.<name>()`` as ``(H, W, 3)`` uint8: the demo's colour photos through
    :func:`fastxai.demo.load_photo`; for the others, the first image of a tuple (the stereo pair's
    left view), booleans as 0/255 and grey replicated to three channels."""
    if name in available_photos():
        return load_photo(name)
    from skimage import data

    image = getattr(data, name)()
    if isinstance(image, tuple):
        image = image[0]
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    return to_rgb_uint8(image)


def random_crops(rgb: np.ndarray, count: int, generator: torch.Generator) -> list[np.ndarray]:
    """``count`` random square crops of ``rgb`` (side ``sqrt(a)`` times its short side, ``a``
    uniform in ``[MIN_CROP_AREA, 1]``, uniform position), each flipped left-right with
    probability 1/2. The model's ``preprocess`` resizes them to its input size."""
    height, width = rgb.shape[:2]
    short = min(height, width)
    crops = []
    for _ in range(count):
        area = MIN_CROP_AREA + (1 - MIN_CROP_AREA) * float(torch.rand((), generator=generator))
        side = max(16, round(short * math.sqrt(area)))
        top = int(torch.randint(0, height - side + 1, (), generator=generator))
        left = int(torch.randint(0, width - side + 1, (), generator=generator))
        crop = rgb[top : top + side, left : left + side]
        if float(torch.rand((), generator=generator)) < 0.5:
            crop = crop[:, ::-1]
        crops.append(np.ascontiguousarray(crop))
    return crops


def training_set(
    loaded: LoadedModel, photos: Sequence[str], crops_per_photo: int, seed: int
) -> Tensor:
    """Preprocessed random crops of ``photos``, ``(len(photos) * crops_per_photo, 3, 224, 224)``."""
    generator = torch.Generator().manual_seed(seed)
    crops = [c for p in photos for c in random_crops(skimage_photo(p), crops_per_photo, generator)]
    return torch.cat([loaded.preprocess(c) for c in crops])


def cache_name(prefix: str, config: dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    return f"{prefix}-{digest}.pt"


def per_image_am(
    model: nn.Module, x: Tensor, photos: Sequence[str], config: dict[str, Any], out: Path
) -> dict[str, Any]:
    """Per-image AM of each photo of ``x`` (one call per photo: on a CPU at one thread, three
    photos batched were about 2x slower per photo than one alone), each cached in ``out``:
    ``mask``, ``soft_mask``, ``summaries`` and ``seconds`` (per photo, compile included)."""
    results = []
    for i, photo in enumerate(photos):
        key = {**config, "photos": [photo]}
        path = out / cache_name("per-image", key)
        if path.exists():
            print(f"per-image AM {photo}: cached {path}", flush=True)
            results.append(torch.load(path, weights_only=False))
            continue
        start = time.perf_counter()
        ex = activation_matching(
            model,
            x[i : i + 1],
            recipe="paper",
            steps=config["steps"],
            lr=config["lr"],
            seed=config["seed"],
        )
        result = {
            "config": key,
            "mask": ex.mask,
            "soft_mask": ex.extras["soft_mask"],
            "summaries": [am_summary(ex)],
            "seconds": time.perf_counter() - start,
        }
        atomic_save(result, path)
        results.append(result)
    return {
        "mask": torch.cat([r["mask"] for r in results]),
        "soft_mask": torch.cat([r["soft_mask"] for r in results]),
        "summaries": [s for r in results for s in r["summaries"]],
        "seconds": [r["seconds"] for r in results],
    }


def amortised(
    model: nn.Module, x: Tensor, config: dict[str, Any], out: Path
) -> tuple[AmortisedExplainer, float]:
    """The amortised explainer trained on ``x`` with ``config`` (cached in ``out``) and its
    training seconds."""
    path = out / cache_name("amortised", config)
    if path.exists():
        print(f"amortised AM: cached {path}", flush=True)
        saved = torch.load(path, weights_only=False)
        layers = normalise_layers(model, x[:1], None)
        weights = LossWeights.from_any(None)
        explainer = AmortisedExplainer(
            model, saved["params"], layers, weights, saved["history"], config["generator"]
        )
        return explainer, saved["seconds"]
    names = ("steps", "batch_size", "lr", "seed", "width", "generator", "area_warmup")
    options = {k: config[k] for k in names}
    start = time.perf_counter()
    explainer = train_amortised(model, x, **options)
    seconds = time.perf_counter() - start
    saved = {"config": config, "params": explainer.params, "history": explainer.history}
    atomic_save({**saved, "seconds": seconds}, path)
    return explainer, seconds


def explain_in_chunks(
    explainer: AmortisedExplainer, x: Tensor, chunk: int = 16
) -> dict[str, Tensor]:
    """Kept fraction and top-1 kept of the amortised explanations of ``x``."""
    kept, top1 = [], []
    for part in x.split(chunk):
        ex = explainer.explain(part)
        kept.append(ex.extras["kept_fraction"])
        top1.append(ex.extras["top1_kept"])
    return {"kept": torch.cat(kept), "top1_kept": torch.cat(top1)}


def iou(a: Tensor, b: Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def loss_total(history: Tensor, steps: slice) -> float:
    weights = LossWeights.from_any(None).as_tensor(history)
    return float((history[steps] @ weights).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", nargs="+", default=list(HELD_OUT))
    parser.add_argument("--train-photos", nargs="+", default=list(TRAIN_PHOTOS))
    parser.add_argument("--crops-per-photo", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1500, help="amortised training steps")
    parser.add_argument("--batch-size", type=int, default=4, help="amortised mini-batch")
    parser.add_argument("--lr", type=float, default=1e-4, help="amortised learning rate")
    parser.add_argument("--width", type=int, default=32, help="amortised generator width")
    parser.add_argument(
        "--area-warmup", type=int, default=0, help="steps over which the area weight grows"
    )
    parser.add_argument(
        "--generator", choices=GENERATORS, default="features", help="amortised generator"
    )
    parser.add_argument("--per-image-steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--per-image-lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("am-amortised"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-per-image", action="store_true", help="amortised results only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overlap = {*args.held_out, *(ALIASES.get(p, p) for p in args.held_out)} & set(args.train_photos)
    if overlap:
        parser.error(f"--train-photos includes held-out photos: {', '.join(sorted(overlap))}")

    loaded = load_efficientnet_lite0()
    model = loaded.model
    rgbs = [skimage_photo(p) for p in args.held_out]
    x = torch.cat([loaded.preprocess(rgb) for rgb in rgbs])
    train_x = training_set(loaded, args.train_photos, args.crops_per_photo, args.seed)
    load = os.getloadavg()[0]
    print(
        f"EfficientNet-Lite0, {args.threads} thread(s), load {load:.2f}; training set: "
        f"{train_x.shape[0]} crops of {len(args.train_photos)} photos; held out: "
        f"{', '.join(args.held_out)}",
        flush=True,
    )

    amortised_config = {
        "photos": args.train_photos,
        "crops_per_photo": args.crops_per_photo,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "width": args.width,
        "seed": args.seed,
        "generator": args.generator,
        "area_warmup": args.area_warmup,
    }
    explainer, train_seconds = amortised(model, train_x, amortised_config, args.out)
    history = explainer.history
    tenth = slice(None, max(1, args.steps // 10))
    last = slice(-max(1, args.steps // 10), None)
    print(
        f"amortised {args.generator}: {args.steps} steps x batch {args.batch_size}, "
        f"lr {args.lr:g}, width "
        f"{args.width}: trained in {train_seconds:.0f} s ({train_seconds / args.steps:.2f} s/step);"
        f" weighted loss {loss_total(history, tenth):.3f} (first tenth) -> "
        f"{loss_total(history, last):.3f} (last tenth; its area term, the mean soft mask, "
        f"{float(history[last, TERMS.index('area')].mean()):.3f})",
        flush=True,
    )
    explainer.explain(x[:1])  # warm-up: traces the feature extractor
    amortised_ex, amortised_seconds = [], []
    for i in range(x.shape[0]):
        start = time.perf_counter()
        amortised_ex.append(explainer.explain(x[i : i + 1]))
        amortised_seconds.append(time.perf_counter() - start)
    amortised_rows = [am_summary(ex) for ex in amortised_ex]
    for i, (photo, row) in enumerate(zip(args.held_out, amortised_rows, strict=True)):
        soft = amortised_ex[i].extras["soft_mask"][0]
        print(
            f"  amortised {photo:<10} kept {100 * row['kept']:.1f}%, top-1 kept "
            f"{row['top1_kept']}, p {row['p_x']:.3f} -> {row['p_e']:.3f}, soft mask "
            f"{float(soft.min()):.3f}..{float(soft.max()):.3f} ({amortised_seconds[i]:.2f} s)",
            flush=True,
        )
    on_train = explain_in_chunks(explainer, train_x)
    if args.skip_per_image:
        return

    per_image_config = {
        "steps": args.per_image_steps,
        "lr": args.per_image_lr,
        "seed": args.seed,
    }
    reference = per_image_am(model, x, args.held_out, per_image_config, args.out)
    per_photo_seconds = float(np.mean(reference["seconds"]))

    header = (
        f"{'photo':<9} {'top-1 class':<16} {'AM kept':>8} {'AM top1':>8} {'amort kept':>10} "
        f"{'amort top1':>10} {'mask IoU':>8} {'AM s':>7} {'amort s':>8}"
    )
    print(
        f"\nper-image AM: {args.per_image_steps} steps, lr {args.per_image_lr:g}, "
        f"one call per photo: {sum(reference['seconds']):.0f} s"
    )
    print(header)
    print("-" * len(header))
    for i, photo in enumerate(args.held_out):
        am, am_row = reference["summaries"][i], amortised_rows[i]
        name = class_name(loaded.class_names, am["top1_x"])
        overlap_iou = iou(reference["mask"][i], amortised_ex[i].mask[0])
        print(
            f"{photo:<9} {name[:16]:<16} {100 * am['kept']:>7.1f}% {am['top1_kept']!s:>8} "
            f"{100 * am_row['kept']:>9.1f}% {am_row['top1_kept']!s:>10} {overlap_iou:>8.3f} "
            f"{reference['seconds'][i]:>7.0f} {amortised_seconds[i]:>8.2f}"
        )
        tag = f"{args.generator}-w{args.width}-lr{args.lr:g}-s{args.steps}-a{args.area_warmup}"
        save_overlays(
            args.out / f"{photo}_am_vs_amortised-{tag}.png", rgbs[i], reference, i, amortised_ex[i]
        )
    n = x.shape[0]
    am_top1 = sum(s["top1_kept"] for s in reference["summaries"])
    amort_top1 = sum(s["top1_kept"] for s in amortised_rows)
    am_kept = np.mean([s["kept"] for s in reference["summaries"]])
    amort_kept = np.mean([s["kept"] for s in amortised_rows])
    mean_amortised_seconds = float(np.mean(amortised_seconds))
    print(
        f"\ntop-1 agreement (masked image keeps the photo's top-1): per-image AM {am_top1}/{n}, "
        f"amortised {amort_top1}/{n}\n"
        f"mean kept fraction: per-image AM {100 * am_kept:.1f}%, amortised {100 * amort_kept:.1f}%"
        f"\nseconds per photo: per-image AM {per_photo_seconds:.0f} s (incl. compile), "
        f"amortised {mean_amortised_seconds:.2f} s (one forward after {train_seconds:.0f} s of "
        f"training): {per_photo_seconds / mean_amortised_seconds:.0f}x faster per photo\n"
        f"amortised on its {train_x.shape[0]} training crops: mean kept "
        f"{100 * float(on_train['kept'].mean()):.1f}%, top-1 kept "
        f"{int(on_train['top1_kept'].sum())}/{train_x.shape[0]} "
        f"({100 * float(on_train['top1_kept'].float().mean()):.0f}%); held out: mean kept "
        f"{100 * amort_kept:.1f}%, top-1 kept {amort_top1}/{n}"
    )


def save_overlays(
    path: Path, rgb: np.ndarray, reference: dict[str, Any], index: int, ex: Any
) -> None:
    """Per-image AM's mask of photo ``index`` and the amortised one side by side, to ``path``."""
    from fastxai.viz import side_by_side, tft_overlay

    display = crop_and_resize(rgb)
    pictures = [
        tft_overlay(
            display,
            reference["soft_mask"][index].float().numpy(),
            reference["mask"][index].numpy(),
        ),
        tft_overlay(display, ex.extras["soft_mask"][0].float().numpy(), ex.mask[0].numpy()),
    ]
    side_by_side(pictures, ["per-image AM", "amortised"], path)


if __name__ == "__main__":
    main()
