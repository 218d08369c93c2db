"""Activation Matching stability: the same photo, other seeds and thread counts, the same mask?

EfficientNet-Lite0 (ImageNet weights from the demo extras) on scikit-image photos. Each run
(one thread count, one seed) explains every photo in one batched call and is cached in ``--out``
(``<recipe>_t<threads>_s<seed>.pt``), so the runs can be spread over several invocations and
1-thread runs can go side by side. The table then gives, per photo: the mean pairwise IoU of the
selected masks over all runs, the kept fraction (min-max), the chosen area, whether every
selected mask keeps the top-1 (or says that no area did), the undecided pixels
(:math:`|p - 0.5| < 0.1`) and the share of 16 noise/blur backgrounds under which the mask keeps the
top-1 (:func:`fastxai.matching.robustness.background_robustness`), plus the seconds per image of
each run. The rows go to ``benchmarks/results/am_stability.json`` (``--background blur``:
``am_stability-blur.json``; ``--results`` for another file), rendered by ``benchmarks/tables.py``;
``--out`` only caches the runs.

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
import itertools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _results import RESULTS_DIR, Results, add_results_option

from fastxai.demo import load_photo
from fastxai.matching import activation_matching
from fastxai.matching.robustness import background_robustness
from fastxai.models import class_name, load_efficientnet_lite0

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
COLUMNS = [
    ("photo", "photo"),
    ("class", "class"),
    ("iou", "mean pairwise IoU (min)"),
    ("kept", "kept %"),
    ("area", "area"),
    ("top1_kept", "top-1 kept"),
    ("p", "p(x) -> p(e)"),
    ("undecided", "undecided %", "{:.2f}"),
    ("robust", "robust (16 bg)"),
]
RUN_COLUMNS = [
    ("threads", "threads"),
    ("seed", "seed"),
    ("seconds_per_image", "s/image", "{:.1f}"),
    ("cpu_per_wall", "cpu/wall", "{:.2f}"),
    ("load", "load", "{:.2f}"),
]


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


def span(values: list[float], fmt: str) -> str:
    """``low-high`` in ``fmt``, or one value when both print alike."""
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return low if low == high else f"{low}-{high}"


def table(runs: dict[tuple[int, int], dict], photos: list[str], class_names: list[str]) -> list:
    rows = []
    for i, photo in enumerate(photos):
        masks = [r["mask"][i] for r in runs.values()]
        pairs = [iou(a, b) for a, b in itertools.combinations(masks, 2)] or [1.0]
        mean, low = f"{sum(pairs) / len(pairs):.3f}", f"{min(pairs):.3f}"
        first = next(iter(runs.values()))
        areas = sorted({round(100 * float(r["area"][i])) for r in runs.values()})
        if all(bool(r["top1_kept"][i]) for r in runs.values()):
            top1 = "yes"
        elif not all(bool(r["found"][i]) for r in runs.values()):
            top1 = "no area kept it"
        else:
            top1 = "no"
        p_e = span([float(r["p_e"][i]) for r in runs.values()], "{:.2f}")
        robust = span([100 * float(r["robust"][i]) for r in runs.values()], "{:.0f}")
        rows.append(
            {
                "photo": photo,
                "class": class_name(class_names, int(first["top1_x"][i])),
                "iou": mean if mean == low else f"{mean} ({low})",
                "kept": span([100 * float(r["kept"][i]) for r in runs.values()], "{:.1f}"),
                "area": " / ".join(f"{a} %" for a in areas),
                "top1_kept": top1,
                "p": f"{float(first['p_x'][i]):.2f} -> {p_e}",
                "undecided": max(100 * float(r["undecided"][i]) for r in runs.values()),
                "robust": f"{robust} %",
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
    add_results_option(parser)
    args = parser.parse_args()
    if args.results is True and args.background != "zero":
        args.results = RESULTS_DIR / f"am_stability-{args.background}.json"
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
    results = Results(__file__, args.results)
    results.table("main", COLUMNS, f"{args.recipe} recipe, runs (threads, seed): {sorted(runs)}")
    for row in table(runs, args.photos, loaded.class_names):
        results.add("main", row)
    results.table("runs", RUN_COLUMNS)
    for (threads, seed), run in sorted(runs.items()):
        results.add(
            "runs",
            {
                "threads": threads,
                "seed": seed,
                "seconds_per_image": run["seconds_per_image"],
                "cpu_per_wall": run["cpu_per_wall"],
                "load": run["load"],
            },
        )
    results.finish()
    print(results.markdown("main"))
    print(results.markdown("runs"))


if __name__ == "__main__":
    main()
