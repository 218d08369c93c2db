"""Activation Matching stability: the same photo, other seeds and thread counts, the same mask?

EfficientNet-Lite0 (ImageNet weights from the demo extras) on scikit-image photos. Each run
(one thread count, one seed) explains every photo in one batched call and is cached in ``--out``
(``<recipe>_t<threads>_s<seed>.pt``), so the runs can be spread over several invocations and
1-thread runs can go side by side. The table then gives, per photo: the mean pairwise IoU of the
selected masks over all runs, the kept fraction (min-max), the chosen area, whether every
selected mask keeps the top-1 (or says that no area did), the undecided pixels
(:math:`|p - 0.5| < 0.1`) and the share of 16 noise/blur backgrounds under which the mask keeps the
top-1 (:func:`fastxai.matching.robustness.background_robustness`), plus the seconds per image of
each run. ``--csv`` writes the table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/am_stability.py --threads 1 --seeds 0 --out D &
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/am_stability.py --threads 1 --seeds 1 --out D
    .venv/bin/python benchmarks/am_stability.py --threads 2 --seeds 0 1 2 --out D
    .venv/bin/python benchmarks/am_stability.py --threads 1 2 --seeds 0 1 2 --out D --table-only

The stable recipe has no seed (its runs with other seeds are plain repeats); ``--input-noise
1e-6 --seeds 1 2`` perturbs the photos instead, one draw per seed (a stronger test of the same
kind as another thread count), and the table pools those runs with the cached noise-free ones
(seed 0) of the same thread counts.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import time
from pathlib import Path

import torch

from fastxai.demo import load_photo
from fastxai.matching import activation_matching
from fastxai.matching.robustness import background_robustness
from fastxai.models import class_name, load_efficientnet_lite0

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def run_path(
    out: Path, recipe: str, threads: int, seed: int, noise: float, background: str = "zero"
) -> Path:
    suffix = (f"_n{noise:g}" if noise else "") + (f"_{background}" if background != "zero" else "")
    return out / f"{recipe}_t{threads}_s{seed}{suffix}.pt"


def run_once(
    loaded, x: torch.Tensor, recipe: str, threads: int, seed: int, steps: int | None, extra: dict
):
    torch.set_num_threads(threads)
    load, start, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
    # the stable recipe has no seed: its runs with other "seeds" are plain repeats
    options = {"steps": steps, "seed": seed} if recipe == "paper" else {}
    ex = activation_matching(loaded.model, x, recipe=recipe, progress=False, **options, **extra)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    robust = background_robustness(loaded.model, x, ex.mask, ex.extras["top1_x"])
    extras = ex.extras
    soft = extras["soft_mask"]
    return {
        "mask": ex.mask,
        "kept": extras["kept_fraction"],
        "area": extras.get("area", torch.full((x.shape[0],), float("nan"))),
        "found": extras.get("found", extras["top1_kept"]),
        "top1_kept": extras["top1_kept"],
        "top1_x": extras["top1_x"],
        "p_x": extras["prob_x"],
        "p_e": extras["prob_e"],
        "undecided": ((soft.float() - 0.5).abs() < 0.1).flatten(1).float().mean(1),
        "robust": robust,
        "seconds_per_image": wall / x.shape[0],
        "cpu_per_wall": cpu / wall,
        "load": load,
    }


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def table(runs: dict[tuple[int, int], dict], photos: list[str], class_names: list[str]) -> list:
    rows = []
    for i, photo in enumerate(photos):
        masks = [r["mask"][i] for r in runs.values()]
        pairs = [iou(a, b) for a, b in itertools.combinations(masks, 2)]
        kept = [float(r["kept"][i]) for r in runs.values()]
        first = next(iter(runs.values()))
        rows.append(
            {
                "photo": photo,
                "class": class_name(class_names, int(first["top1_x"][i])),
                "runs": len(masks),
                "mean_pairwise_iou": sum(pairs) / len(pairs) if pairs else 1.0,
                "min_pairwise_iou": min(pairs) if pairs else 1.0,
                "kept_min": min(kept),
                "kept_max": max(kept),
                "areas": sorted({round(float(r["area"][i]), 3) for r in runs.values()}),
                "found_all": all(bool(r["found"][i]) for r in runs.values()),
                "top1_kept_all": all(bool(r["top1_kept"][i]) for r in runs.values()),
                "p_x": float(first["p_x"][i]),
                "p_e": [round(float(r["p_e"][i]), 3) for r in runs.values()],
                "undecided_max": max(float(r["undecided"][i]) for r in runs.values()),
                "robust_min": min(float(r["robust"][i]) for r in runs.values()),
                "robust_max": max(float(r["robust"][i]) for r in runs.values()),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs="+", default=list(PHOTOS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--recipe", default="stable", choices=["stable", "paper"])
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--out", type=Path, required=True, help="cache of the runs")
    parser.add_argument("--table-only", action="store_true", help="only read cached runs")
    parser.add_argument(
        "--input-noise",
        type=float,
        default=0.0,
        help="add this much Gaussian noise (drawn from each run's seed) to the photos: the "
        "stable recipe has no seed, so this is what its 'seeds' vary (seeds >= 1)",
    )
    parser.add_argument(
        "--background", default="zero", choices=["zero", "blur"], help="stable recipe only"
    )
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load_efficientnet_lite0()
    x = torch.cat([loaded.preprocess(load_photo(p)) for p in args.photos])
    runs = {}
    if args.input_noise and 0 in args.seeds:
        parser.error("--input-noise: seed 0 is kept for the noise-free run; use seeds >= 1")
    for threads, seed in itertools.product(args.threads, args.seeds):
        path = run_path(args.out, args.recipe, threads, seed, args.input_noise, args.background)
        if path.exists():
            cached = torch.load(path, weights_only=False)
            if cached["photos"] == args.photos and cached["steps"] == args.steps:
                runs[threads, seed] = cached["run"]
                continue
        if args.table_only:
            continue
        noisy = x
        if args.input_noise:
            g = torch.Generator().manual_seed(seed)
            noisy = x + args.input_noise * torch.randn(x.shape, generator=g)
        extra = {"background": args.background} if args.recipe == "stable" else {}
        run = run_once(loaded, noisy, args.recipe, threads, seed, args.steps, extra)
        tmp = path.with_suffix(".tmp")
        torch.save({"photos": args.photos, "steps": args.steps, "run": run}, tmp)
        tmp.replace(path)
        runs[threads, seed] = run
        print(
            f"threads {threads} seed {seed}: {run['seconds_per_image']:.1f} s/image "
            f"(cpu/wall {run['cpu_per_wall']:.2f}, load {run['load']:.2f})",
            flush=True,
        )
    if args.input_noise:  # compare with the noise-free runs where they are cached
        for threads in args.threads:
            clean = run_path(args.out, args.recipe, threads, 0, 0.0, args.background)
            if clean.exists():
                runs[threads, 0] = torch.load(clean, weights_only=False)["run"]
    if not runs:
        print("no runs cached yet")
        return
    rows = table(runs, args.photos, loaded.class_names)
    print(f"\n{args.recipe} recipe, {len(runs)} runs (threads x seeds): {sorted(runs)}")
    print(
        "| photo | class | mean pairwise IoU (min) | kept % | area | top-1 kept | p(x) -> p(e) "
        "| undecided % | robust (16 bg) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kept = f"{100 * r['kept_min']:.1f}-{100 * r['kept_max']:.1f}"
        top1 = "yes" if r["top1_kept_all"] else ("no area kept it" if not r["found_all"] else "no")
        p_e = f"{min(r['p_e']):.2f}-{max(r['p_e']):.2f}"
        print(
            f"| {r['photo']} | {r['class']} | {r['mean_pairwise_iou']:.3f} "
            f"({r['min_pairwise_iou']:.3f}) | {kept} | {r['areas']} | {top1} "
            f"| {r['p_x']:.2f} -> {p_e} | {100 * r['undecided_max']:.2f} "
            f"| {100 * r['robust_min']:.0f}-{100 * r['robust_max']:.0f} % |"
        )
    per_image = {k: round(v["seconds_per_image"], 1) for k, v in runs.items()}
    print(f"seconds per image by (threads, seed): {per_image}")
    if args.csv:
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
