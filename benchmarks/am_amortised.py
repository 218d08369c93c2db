"""Amortised Activation Matching against the stable per-image recipe on held-out photos
(EfficientNet-Lite0).

One decoder (:func:`fastxai.matching.amortised.train_amortised`) is trained over random square
crops (with flips) of the scikit-image / scikit-learn photos that are not held out; it then
explains each held-out photo with one forward and a batched ladder. The stable recipe
(:func:`fastxai.activation_matching`, one call per photo) is the reference. Per held-out photo
the table gives both selected areas, kept fractions, whether the class is kept, the IoU of the
selected masks and of the masks at each rung of the ladder (same area, so it measures agreement
on *where*), and the seconds each took; the summary adds the decoder's results on its own
training crops (the train / held-out gap) and on the held-out photos' 2nd class.

Runs are cached in ``--out`` (decoder, stable masks), so a rerun only evaluates. The rows go to
``benchmarks/results/am_amortised.json`` (``--results``), rendered by ``benchmarks/tables.py``.
Reproduce the reported run (about 20 minutes on 2 CPU threads):

    .venv/bin/python benchmarks/am_amortised.py --out /tmp/am-amortised
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _results import Results, add_results_option

from fastxai import activation_matching
from fastxai.demo import available_photos, load_photo
from fastxai.io import atomic_save
from fastxai.matching.amortised import AmortisedExplainer, train_amortised
from fastxai.models import LoadedModel, load_efficientnet_lite0, to_rgb_uint8

HELD_OUT = ("chelsea", "coffee", "astronaut", "rocket")
COLUMNS = [
    ("photo", "held-out photo"),
    ("amortised", "amortised: kept, top-1 kept, p(e)/p(x)"),
    ("gradcam", "Grad-CAM ranking: kept, top-1 kept"),
    ("stable", "stable recipe: kept (top-1 kept)"),
    ("iou_selected", "IoU amortised / stable", "{:.2f}"),
    ("iou_per_rung", "IoU per rung 5..30 %"),
    ("amortised_s", "amortised s", "{:.2f}"),
    ("stable_s", "stable s", "{:.0f}"),
]
TRAINING_COLUMNS = [
    ("rank_by", "cells ranked by"),
    ("keeps", "training crops keeping their top-1 %", "{:.0f}"),
    ("kept", "mean kept %", "{:.1f}"),
]
# Bundled with scikit-image (no download) and scikit-learn; "cat" is chelsea, so it is left out.
TRAIN_PHOTOS = (
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
    "china",
    "flower",
)
TRAINING = ("steps", "batch_size", "lr", "width", "temperature", "seed")
MIN_CROP_AREA = 0.2  # smallest crop, as a fraction of the photo's largest square


def photo(name: str) -> np.ndarray:
    """``(H, W, 3)`` uint8: a demo photo, a scikit-learn sample image or ``skimage.data.<name>``
    (a tuple's first image, booleans as 0/255, grey replicated to three channels)."""
    if name in available_photos():
        return load_photo(name)
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    from skimage import data

    image = getattr(data, name)()
    image = np.asarray(image[0] if isinstance(image, tuple) else image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    return to_rgb_uint8(image)


def random_crops(rgb: np.ndarray, count: int, generator: torch.Generator) -> list[np.ndarray]:
    """``count`` random square crops (area fraction uniform in ``[MIN_CROP_AREA, 1]`` of the
    largest square, uniform position), each flipped left-right with probability 1/2."""
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


def training_set(loaded: LoadedModel, photos: list[str], per_photo: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    crops = [c for p in photos for c in random_crops(photo(p), per_photo, generator)]
    return torch.cat([loaded.preprocess(c) for c in crops])


def training_code_digest() -> str:
    """sha1 of the training code, so a cached decoder is reused only by the code that made it."""
    from fastxai.matching import amortised, feature_decoder, saliency_losses

    digest = hashlib.sha1()
    for module in (amortised, feature_decoder, saliency_losses):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


def cached(out: Path, prefix: str, config: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    return out / f"{prefix}-{digest}.pt"


def iou(a: Tensor, b: Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def stable_masks(model: torch.nn.Module, x: Tensor, names: list[str], out: Path) -> list[dict]:
    results = []
    for i, name in enumerate(names):
        path = cached(out, "stable", {"photo": name})
        if not path.exists():
            start = time.perf_counter()
            ex = activation_matching(model, x[i : i + 1], progress=False)
            result = {
                "mask": ex.mask[0],
                "rungs": ex.extras["ladder"]["masks"][0],
                "area": float(ex.extras["area"][0]),
                "kept": float(ex.extras["kept_fraction"][0]),
                "keeps": bool(ex.extras["found"][0]),
                "seconds": time.perf_counter() - start,
            }
            atomic_save(result, path)
        results.append(torch.load(path, weights_only=False))
    return results


def train(model: torch.nn.Module, data: Tensor, config: dict, out: Path) -> tuple[Any, float]:
    path = cached(out, "amortised", config)
    if path.exists():
        return AmortisedExplainer.load(path, model), torch.load(path.with_suffix(".s"))
    options = {k: config[k] for k in TRAINING}
    start = time.perf_counter()
    explainer = train_amortised(model, data, **options)
    seconds = time.perf_counter() - start
    explainer.save(path)
    torch.save(seconds, path.with_suffix(".s"))
    return explainer, seconds


def found_share(
    explainer: AmortisedExplainer, x: Tensor, rank_by: str, chunk: int = 32
) -> tuple[float, float]:
    """Share of ``x`` whose selected mask (cells ranked ``rank_by``) keeps the top-1, and their
    mean kept fraction."""
    import warnings

    found, kept = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for part in x.split(chunk):
            ex = explainer.explain(part, rank_by=rank_by)
            found.append(ex.extras["found"])
            kept.append(ex.extras["kept_fraction"][ex.extras["found"]])
    kept_all = torch.cat(kept)
    return float(torch.cat(found).float().mean()), float(kept_all.mean()) if len(kept_all) else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", nargs="+", default=list(HELD_OUT))
    parser.add_argument("--train-photos", nargs="+", default=list(TRAIN_PHOTOS))
    parser.add_argument("--crops-per-photo", type=int, default=24)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eval-every", type=int, default=4, help="evaluate every k-th training crop"
    )
    parser.add_argument("--out", type=Path, default=Path("am-amortised"), help="run cache")
    add_results_option(parser)
    args = parser.parse_args()
    if set(args.held_out) & set(args.train_photos):
        parser.error("--train-photos includes a held-out photo")
    args.out.mkdir(parents=True, exist_ok=True)

    loaded = load_efficientnet_lite0()
    model = loaded.model.eval()
    x = torch.cat([loaded.preprocess(photo(p)) for p in args.held_out])
    data = training_set(loaded, args.train_photos, args.crops_per_photo, args.seed)
    config = {k: getattr(args, k) for k in TRAINING}
    config["code"] = training_code_digest()
    config.update(photos=args.train_photos, crops_per_photo=args.crops_per_photo)
    explainer, train_seconds = train(model, data, config, args.out)
    history = explainer.history
    tenth = max(1, len(history) // 10)
    print(
        f"EfficientNet-Lite0, {torch.get_num_threads()} threads: decoder trained on "
        f"{data.shape[0]} crops of {len(args.train_photos)} photos, {args.steps} steps x "
        f"{args.batch_size}, lr {args.lr:g}, in {train_seconds:.0f} s; loss "
        f"{float(history[:tenth].sum(1).mean()):.2f} (first tenth) -> "
        f"{float(history[-tenth:].sum(1).mean()):.2f} (last tenth)",
        flush=True,
    )
    reference = stable_masks(model, x, args.held_out, args.out)
    explainer.explain(x[:1])  # warm-up (traces the classifier)
    results = Results(__file__, args.results)
    results.table("held_out", COLUMNS)
    top1_masks = []
    for i, name in enumerate(args.held_out):
        start = time.perf_counter()
        ex = explainer.explain(x[i : i + 1])
        seconds = time.perf_counter() - start
        baseline = explainer.explain(x[i : i + 1], rank_by="gradcam")
        top1_masks.append(ex.mask[0])
        ref = reference[i]
        rung_iou = [
            iou(a, b) for a, b in zip(ex.extras["ladder"]["masks"][0], ref["rungs"], strict=True)
        ]
        amortised_kept = 100 * float(ex.extras["kept_fraction"][0])
        ratio = float(ex.extras["prob_e"][0] / ex.extras["prob_x"][0])
        if bool(ex.extras["found"][0]):
            amortised = f"{amortised_kept:.1f} %, yes, {ratio:.2f}"
        else:
            amortised = f"{amortised_kept:.1f} %, **no** ({ratio:.2f})"
        gradcam_kept = 100 * float(baseline.extras["kept_fraction"][0])
        gradcam_keeps = "yes" if bool(baseline.extras["found"][0]) else "no"
        stable = f"{100 * ref['kept']:.1f} %" + ("" if ref["keeps"] else " (**no**)")
        row = {
            "photo": name,
            "amortised": amortised,
            "gradcam": f"{gradcam_kept:.1f} %, {gradcam_keeps}",
            "stable": stable,
            "iou_selected": iou(ex.mask[0], ref["mask"]),
            "iou_per_rung": " ".join(f"{v:.2f}" for v in rung_iou),
            "amortised_s": seconds,
            "stable_s": ref["seconds"],
        }
        results.add("held_out", row)
        print(row, file=sys.stderr, flush=True)
    results.table("training", TRAINING_COLUMNS, f"Every {args.eval_every}th training crop.")
    for rank_by in ("decoder", "gradcam"):
        share, kept = found_share(explainer, data[:: args.eval_every], rank_by)
        results.add("training", {"rank_by": rank_by, "keeps": 100 * share, "kept": 100 * kept})
    with torch.no_grad():
        second = model(x).topk(2, 1).indices[:, 1]
    ex2 = explainer.explain(x, second)
    print(
        "held-out photos' 2nd class: kept by "
        f"{int(ex2.extras['found'].sum())}/{x.shape[0]} masks, kept "
        + ", ".join(f"{100 * float(k):.1f}%" for k in ex2.extras["kept_fraction"])
        + "; IoU with the top-1 masks "
        + ", ".join(f"{iou(a, b):.2f}" for a, b in zip(ex2.mask, top1_masks, strict=True))
    )
    results.finish()
    print(results.markdown("held_out"))
    print(results.markdown("training"))


if __name__ == "__main__":
    main()
