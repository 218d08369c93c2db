"""Activation Matching speed: ``fastxai.activation_matching`` against a straightforward loop.

resnet18 (random weights, randomised BatchNorm statistics) at 224, the default schedule
(U-Net width 32, depth 4, Adam 5e-5, one N(0, 1) background). The straightforward loop trains
the same generator from the same seed with the same noise, but recomputes the targets phi(x) and
f(x) every step, runs e and the noisy copy through the classifier in separate forwards and
computes the loss terms eagerly (pure-PyTorch mask priors), as the authors' notebook does.

Runs are interleaved (A B A B ...), each ``--steps`` long after a warm-up that compiles; the
medians of seconds per step are extrapolated to the 880-step schedule. Prints the load average
and process CPU time / wall time beside each figure. ``--full`` also runs one full 880-step
schedule of each and compares the final losses.

    flock /tmp/fastxai-bench.lock .venv/bin/python benchmarks/am.py --threads 2

``--batch B`` gives fastxai B images per call (one generator each) and divides its step time by B.
``--device cuda`` runs both on a GPU (grouped U-Net convolutions; each timing synchronises; the
cpu/wall trust filter is for CPU runs only):

    .venv/bin/python benchmarks/am.py --device cuda --batch 8 --steps 40 --rounds 3 --full

``--recipes`` instead times the two recipes of ``activation_matching`` per image, interleaved: the
default (stable) recipe's whole call against the paper recipe's ``--steps`` steps extrapolated
to its 880, on ``--model`` (resnet18 with random weights, or EfficientNet-Lite0 with its ImageNet
weights on the demo photos):

    .venv/bin/python benchmarks/am.py --recipes --model efficientnet-lite0 --steps 40 --rounds 2

Progress goes to stderr, the tables to stdout and their rows to ``benchmarks/results/am.json``
(``--recipes``: ``am-recipes.json``; ``--results`` for another file), rendered by
``benchmarks/tables.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _results import RESULTS_DIR, Results, add_results_option

from fastxai.matching import LossWeights, activation_matching
from fastxai.matching.features import default_layers, feature_extractor
from fastxai.matching.generator import (
    generator_logits,
    init_generator_params,
    straight_through_mask,
)
from fastxai.matching.losses import TERMS, activation_loss, ce_loss, kl_loss
from fastxai.matching.paper import DEFAULT_LR, DEFAULT_STEPS
from fastxai.matching.trainer import sample_backgrounds
from fastxai.ops import reference

ROUND_COLUMNS = [
    ("round", "round"),
    ("contender", "contender"),
    ("seconds", "s/step/image", "{:.4f}"),
    ("cpu_per_wall", "cpu/wall", "{:.2f}"),
    ("load", "load", "{:.2f}"),
]
SUMMARY_COLUMNS = [
    ("batch", "batch"),
    ("generator", "generator"),
    ("steps", "steps"),
    ("fastxai", "fastxai s/step/image", "{:.3f}"),
    ("loop", "loop s/step", "{:.3f}"),
    ("speedup", "speed-up (medians)", "{:.2f}x"),
    ("paired", "speed-up (paired)", "{:.2f}x"),
    ("pairs", "trusted pairs"),
    ("fastxai_full", f"fastxai s/image at {DEFAULT_STEPS} steps", "{:.0f}"),
    ("loop_full", f"loop s/image at {DEFAULT_STEPS} steps", "{:.0f}"),
    ("loss_fastxai", "loss fastxai", "{:.5f}"),
    ("loss_loop", "loss loop", "{:.5f}"),
]
FULL_COLUMNS = [
    ("fastxai", "fastxai s/image", "{:.0f}"),
    ("loop", "loop s/image", "{:.0f}"),
    ("speedup", "speed-up", "{:.2f}x"),
    ("loss_fastxai", "final loss fastxai", "{:.4f}"),
    ("loss_loop", "final loss loop", "{:.4f}"),
    ("apart", "% apart", "{:.2f}"),
    ("cpu", "cpu/wall fastxai / loop"),
    ("load", "load", "{:.2f}"),
]
RECIPE_COLUMNS = [
    ("round", "round"),
    ("recipe", "recipe"),
    ("seconds", "s/image", "{:.1f}"),
    ("cpu_per_wall", "cpu/wall", "{:.2f}"),
    ("load", "load", "{:.2f}"),
    ("kept", "kept"),
]


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=g))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=g))
    return model.eval()


def straightforward_loop(model: nn.Module, x: Tensor, steps: int, seed: int) -> Tensor:
    """One image, the notebook's way. Returns the per-step terms ``(steps, len(TERMS))``."""
    layers = default_layers(model, x)
    extractor = feature_extractor(model, [layer.name for layer in layers])
    for p in extractor.parameters():
        p.requires_grad_(False)
    params = init_generator_params([seed], device=x.device)
    for t in params.values():
        t.requires_grad_(True)
    optimiser = torch.optim.Adam(list(params.values()), lr=DEFAULT_LR)
    noise_rng = [torch.Generator(device=x.device).manual_seed(seed)]
    weights = LossWeights().as_tensor(x)
    alphas = [layer.weight for layer in layers]
    distances = [layer.distance for layer in layers]
    history = torch.empty(steps, len(TERMS))
    for step in range(steps):
        noise = sample_backgrounds(("normal",), x, noise_rng)[:, 0]
        with torch.no_grad():
            target_logits, *target_features = extractor(x)
        y = target_logits.argmax(1)
        p = torch.sigmoid(generator_logits(params, x))
        m = straight_through_mask(p)
        e = m * x
        logits_e, *features_e = extractor(e)
        logits_r, *_ = extractor(m * x + (1 - m) * noise)
        priors = reference.mask_priors(p, 4)[0]
        terms = torch.stack(
            [
                activation_loss(target_features, features_e, alphas, distances)[0],
                kl_loss(target_logits, logits_e, 2.0)[0],
                F.cross_entropy(logits_e, y),
                priors[0],
                priors[1],
                priors[2],
                ce_loss(logits_r, y)[0],
                x.new_zeros(()),
            ]
        )
        total = (terms * weights).sum()
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()
        history[step] = terms.detach().cpu()
    return history


def timed(fn) -> tuple[float, float, object]:
    """Wall and CPU seconds of ``fn()`` (a GPU is synchronised before and after)."""
    synchronise = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronise()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    synchronise()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def compare_recipes(args: argparse.Namespace, results: Results) -> None:
    """Seconds per image of the stable recipe (whole call) and the paper recipe (extrapolated)."""
    if args.model == "efficientnet-lite0":
        from fastxai.demo import load_photo
        from fastxai.models import load_efficientnet_lite0

        loaded = load_efficientnet_lite0()
        model = loaded.model
        photos = ("chelsea", "coffee", "astronaut", "rocket")[: args.batch]
        x = torch.cat([loaded.preprocess(load_photo(p)) for p in photos])
    else:
        model = resnet18()
        x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    model, x = model.to(args.device), x.to(args.device)
    results.table(
        "recipes",
        RECIPE_COLUMNS,
        f"{args.model}, batch {args.batch}; paper: {args.steps} steps extrapolated to "
        f"{DEFAULT_STEPS}",
    )

    def stable() -> dict:
        wall, cpu, ex = timed(lambda: activation_matching(model, x, progress=False))
        kept = " ".join(f"{float(k):.3f}" for k in ex.extras["kept_fraction"])
        return {"seconds": wall / args.batch, "cpu_per_wall": cpu / wall, "kept": kept}

    def paper() -> dict:
        wall, cpu, _ = timed(
            lambda: activation_matching(model, x, steps=args.steps, progress=False, recipe="paper")
        )
        per_image = wall / args.steps / args.batch * DEFAULT_STEPS
        return {"seconds": per_image, "cpu_per_wall": cpu / wall, "kept": ""}

    activation_matching(model, x, steps=2, progress=False, recipe="paper")  # compiles
    times: dict[str, list[float]] = {"stable": [], "paper": []}
    for r in range(args.rounds):
        order = (("stable", stable), ("paper", paper))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            load = os.getloadavg()[0]
            row = {"round": r, "recipe": name, "load": load, **fn()}
            results.add("recipes", row)
            log(row)
            times[name].append(row["seconds"])
    med = {k: statistics.median(v) for k, v in times.items()}
    log(
        f"median s/image: stable {med['stable']:.1f}, paper {med['paper']:.1f} "
        f"({med['paper'] / med['stable']:.1f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", action="store_true", help="stable vs paper recipe")
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "efficientnet-lite0"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="steps per timed run")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved A B rounds")
    parser.add_argument("--batch", type=int, default=1, help="images per fastxai call")
    parser.add_argument("--full", action="store_true", help="also one 880-step run of each")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--generator-precision",
        default="float32",
        choices=["float32", "bfloat16"],
        help="fastxai's U-Net precision (the loop always runs float32)",
    )
    add_results_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.recipes and args.results is True:
        args.results = RESULTS_DIR / "am-recipes.json"
    results = Results(__file__, args.results)
    if args.recipes:
        compare_recipes(args, results)
        results.finish()
        print(results.markdown("recipes"))
        return
    model = resnet18().to(args.device)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    x = x.to(args.device)
    weights = LossWeights().as_tensor(x).cpu()

    def ours(steps: int) -> Tensor:
        ex = activation_matching(
            model,
            x,
            steps=steps,
            progress=False,
            recipe="paper",
            generator_precision=args.generator_precision,
        )
        return torch.stack([ex.extras["loss_history"][t] for t in TERMS], 2).cpu()  # (S, N, T)

    results.table("rounds", ROUND_COLUMNS)
    ours(2)  # compiles (cached in TORCHINDUCTOR_CACHE_DIR)
    rows: dict[str, list[tuple[float, float, float]]] = {"fastxai": [], "loop": []}
    finals: dict[str, list[float]] = {"fastxai": [], "loop": []}
    for r in range(args.rounds):
        for name in ("fastxai", "loop"):
            load = os.getloadavg()[0]
            if name == "fastxai":
                wall, cpu, hist = timed(lambda: ours(args.steps))
                per_image = wall / args.steps / args.batch
                finals[name].append(float((hist[-1, 0] * weights).sum()))
            else:
                wall, cpu, hist = timed(lambda: straightforward_loop(model, x[:1], args.steps, 0))
                per_image = wall / args.steps
                finals[name].append(float((hist[-1] * weights).sum()))
            rows[name].append((per_image, cpu / wall, load))
            row = {
                "round": r,
                "contender": name,
                "seconds": per_image,
                "cpu_per_wall": cpu / wall,
                "load": load,
            }
            results.add("rounds", row)
            log(row)
    med = {k: statistics.median(r[0] for r in v) for k, v in rows.items()}
    # A pair is trusted only when both of its runs had their threads (cpu/wall near --threads).
    clean = [
        (a[0], b[0])
        for a, b in zip(rows["fastxai"], rows["loop"], strict=True)
        if min(a[1], b[1]) >= 0.9 * args.threads and args.device == "cpu"
    ]
    results.table("summary", SUMMARY_COLUMNS)
    results.add(
        "summary",
        {
            "batch": args.batch,
            "generator": args.generator_precision,
            "steps": args.steps,
            "fastxai": med["fastxai"],
            "loop": med["loop"],
            "speedup": med["loop"] / med["fastxai"],
            "paired": statistics.median(b / a for a, b in clean) if clean else None,
            "pairs": f"{len(clean)}/{args.rounds}",
            "fastxai_full": med["fastxai"] * DEFAULT_STEPS,
            "loop_full": med["loop"] * DEFAULT_STEPS,
            "loss_fastxai": statistics.median(finals["fastxai"]),
            "loss_loop": statistics.median(finals["loop"]),
        },
    )
    tables = ["summary", "rounds"]
    if args.full:
        wall_a, cpu_a, hist_a = timed(lambda: ours(DEFAULT_STEPS))
        wall_b, cpu_b, hist_b = timed(lambda: straightforward_loop(model, x[:1], DEFAULT_STEPS, 0))
        final_a = float((hist_a[-1, 0] * weights).sum())
        final_b = float((hist_b[-1] * weights).sum())
        results.table("full", FULL_COLUMNS, f"One {DEFAULT_STEPS}-step run of each.")
        results.add(
            "full",
            {
                "fastxai": wall_a / args.batch,
                "loop": wall_b,
                "speedup": wall_b / (wall_a / args.batch),
                "loss_fastxai": final_a,
                "loss_loop": final_b,
                "apart": 100 * abs(final_a - final_b) / abs(final_b),
                "cpu": f"{cpu_a / wall_a:.2f} / {cpu_b / wall_b:.2f}",
                "load": os.getloadavg()[0],
            },
        )
        tables.insert(1, "full")
    results.finish()
    print("\n\n".join(results.markdown(name) for name in tables))


if __name__ == "__main__":
    main()
