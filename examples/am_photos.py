"""Activation Matching on the demo's real classifier (EfficientNet-Lite0, ImageNet weights) and
scikit-image photos: kept-pixel fraction, whether the top-1 survives, probabilities, time.

All photos go in one call. The default is the stable recipe (about a minute per photo on 2 CPU
threads); ``--recipe paper`` trains the notebook's U-Nets (880 steps at lr 5e-5 by default,
minutes per photo; ``--steps`` and ``--lr`` give a shorter schedule).

    .venv/bin/python examples/am_photos.py --out /tmp/am-photos
    .venv/bin/python examples/am_photos.py --recipe paper --steps 200 --lr 2e-4
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from fastxai.demo import load_photo
from fastxai.matching import activation_matching
from fastxai.matching.paper import DEFAULT_LR, DEFAULT_STEPS
from fastxai.matching.present import am_line, am_summary
from fastxai.models import class_name, crop_and_resize, load_efficientnet_lite0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs="+", default=["chelsea", "coffee", "astronaut", "rocket"])
    parser.add_argument("--recipe", default="stable", choices=["stable", "paper"])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="paper recipe only")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="paper recipe only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", default="", help="overrides, e.g. rob=100,tv=500")
    parser.add_argument("--out", type=Path, help="write <photo>_am.png overlays here")
    parser.add_argument("--save-masks", type=Path, help="torch.save the masks to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = {k: float(v) for k, v in (kv.split("=") for kv in args.weights.split(",") if kv)}
    loaded = load_efficientnet_lite0()
    rgbs = [load_photo(p) for p in args.photos]
    x = torch.cat([loaded.preprocess(rgb) for rgb in rgbs])
    load, wall, cpu = os.getloadavg(), time.perf_counter(), time.process_time()
    options = {"steps": args.steps, "lr": args.lr} if args.recipe == "paper" else {}
    ex = activation_matching(
        loaded.model, x, weights=weights or None, recipe=args.recipe, **options
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        f"EfficientNet-Lite0, {len(args.photos)} photos together, {args.recipe} recipe "
        f"{options}, weights {ex.extras['weights']}: {wall:.0f} s "
        f"({wall / len(args.photos):.0f} s/photo, cpu/wall {cpu / wall:.2f}, load {load[0]:.2f})"
    )
    for i, photo in enumerate(args.photos):
        summary = am_summary(ex, i)
        name = class_name(loaded.class_names, summary["top1_x"])
        print(f"  {photo:<10} {name!r:<18} {am_line(summary, loaded.class_names)}")
        if args.out is not None:
            from fastxai.viz import save_png, tft_overlay

            picture = tft_overlay(
                crop_and_resize(rgbs[i]),
                ex.extras["soft_mask"][i].float().numpy(),
                ex.mask[i].numpy(),
            )
            save_png(picture, args.out / f"{photo}_am.png")
    if args.save_masks is not None:
        torch.save({"photos": args.photos, "mask": ex.mask}, args.save_masks)


if __name__ == "__main__":
    main()
