"""Activation fine-tuning on Fashion-MNIST: the paper's Tables 3 and 4 in miniature.

1. Train a small CNN (:class:`fastxai.aft.FashionCNN`) on the 60k training images.
2. For each CAM method, compute TFT masks of the first ``--train-size`` training images at
   ``layer3`` (7x7).
3. Fine-tune a copy of the CNN with Eq. 8 for each method (AFT), and once with the same settings
   and lambda = 0 (a cross-entropy-only control: what fine-tuning does without the masks).
4. On the test set: Average Increase / Drop of the original maps (Table 1 muting), TFT maps and
   AFT maps (Table 3), and the test accuracy of the original and AFT models (Table 4).

Every stage is stored under ``--out`` and reused by a rerun (masks are resumable shards, AFT
checkpoints each epoch). ``--tft-mode``, ``--pool`` and ``--mask-weights`` (another CNN's state
dict) choose how the masks are made; ``--tuner-init mean`` starts the tuner at the targets' mean
(:class:`fastxai.aft.AFTConfig`). Use a new ``--out`` for other mask or AFT settings.
Needs ``apt-get install -y dataset-fashion-mnist``. Run::

    python examples/aft_fashion_mnist.py --out aft-fmnist
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fastxai.aft import AFTConfig, FashionCNN, generate_masks, load_fashion_mnist, load_targets
from fastxai.aft.data import normalise
from fastxai.aft.evaluate import (
    accuracy_table,
    evaluate_methods,
    format_table3,
    format_table4,
)
from fastxai.aft.models import FASHION_CNN_LAYER, accuracy, train_classifier
from fastxai.aft.trainer import AFTTrainer
from fastxai.io import atomic_save


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("aft-fmnist"), help="work folder")
    parser.add_argument("--methods", nargs="+", default=["gradcam", "gradcampp"])
    parser.add_argument("--pretrain-size", type=int, default=60000, help="images to pretrain")
    parser.add_argument("--train-size", type=int, default=20000, help="images for masks + AFT")
    parser.add_argument("--test-size", type=int, default=10000, help="test images for accuracy")
    parser.add_argument("--metric-size", type=int, default=2000, help="test images for Table 3")
    parser.add_argument("--width", type=int, default=16, help="CNN width (layer3 has 4x)")
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--pretrain-batch-size", type=int, default=128)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--aft-epochs", type=int, default=1)
    parser.add_argument("--aft-lr", type=float, default=1e-4)
    parser.add_argument("--aft-optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    parser.add_argument("--aft-batch-size", type=int, default=64)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--linear", action="store_true", help="linear tuner (paper's reading)")
    parser.add_argument(
        "--tuner-init",
        default="random",
        choices=["random", "mean"],
        help="tuner start: PyTorch's random init, or the targets' mean (AFTConfig.tuner_init)",
    )
    parser.add_argument(
        "--tft-mode",
        default="value",
        choices=["value", "percentile"],
        help="TFT ladder of the masks: map values 0.0..0.9 or muted fractions 0.1..0.9",
    )
    parser.add_argument(
        "--pool",
        default="avg",
        choices=["avg", "nearest"],
        help="mask -> 7x7 target: kept fraction per cell, or the cell's sampled pixel",
    )
    parser.add_argument(
        "--mask-weights",
        type=Path,
        default=None,
        help="state dict of the CNN that computes the TFT masks (default: the original)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def mask_statistics(
    fields: dict[str, torch.Tensor], history: list[dict[str, float]]
) -> dict[str, float]:
    """Share of images with tau* = 0, the kept fraction, the targets' per-cell variance (the
    mask term of the best image-independent map) and the mask term of the first and last AFT
    epochs.

    tau* = 0 gives the mask 1[I > 0] (nothing above zero muted). In percentile mode it means no
    threshold raised the probability. In value mode it also counts the images where the ladder's
    own tau = 0 (the same mask) raised it. The shards do not store which case it was.
    """
    target = fields["target"]
    return {
        "tau0_share": float((fields["tau"] == 0).float().mean()),
        "kept_fraction": float(target.mean()),
        "cell_variance": float(target.var(0).mean()),
        "mask_term_first_epoch": history[0]["mask"] if history else float("nan"),
        "mask_term_last_epoch": history[-1]["mask"] if history else float("nan"),
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    """Run every stage; returns the tables as a dict (also written to ``out/tables.json``)."""
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    x_pretrain = normalise(train_images[: args.pretrain_size])
    y_pretrain = train_labels[: args.pretrain_size]
    x_train, y_train = x_pretrain[: args.train_size], y_pretrain[: args.train_size]
    x_test = normalise(test_images[: args.test_size])
    y_test = test_labels[: args.test_size]

    model = FashionCNN(width=args.width)
    base_path = out / "original.pt"
    if base_path.exists():
        model.load_state_dict(torch.load(base_path, weights_only=True))
    else:
        train_classifier(
            model,
            x_pretrain,
            y_pretrain,
            epochs=args.pretrain_epochs,
            batch_size=args.pretrain_batch_size,
            lr=args.pretrain_lr,
            seed=args.seed,
            progress=progress,
        )
        atomic_save(model.state_dict(), base_path)
    model.eval()
    timings = {"pretrain_s": time.perf_counter() - started}

    tuned: dict[str, torch.nn.Module] = {}
    statistics: dict[str, dict[str, float]] = {}
    config = AFTConfig(
        lam=args.lam,
        optimizer=args.aft_optimizer,
        lr=args.aft_lr,
        epochs=args.aft_epochs,
        batch_size=args.aft_batch_size,
        seed=args.seed,
        linear=args.linear,
        tuner_init=args.tuner_init,
        progress=progress,
    )
    mask_model = model
    suffix = ""
    if args.mask_weights is not None:
        mask_model = FashionCNN(width=args.width)
        mask_model.load_state_dict(torch.load(args.mask_weights, weights_only=True))
        mask_model.eval()
        suffix = f"-{args.mask_weights.stem}"  # masks of another model: another folder
    tft_options = {"mode": args.tft_mode} if args.tft_mode != "value" else None
    for method in args.methods:
        stage = time.perf_counter()
        masks = out / f"masks-{method}{suffix}"
        generate_masks(
            mask_model,
            x_train,
            masks,
            layer=FASHION_CNN_LAYER,
            method=method,
            pool=args.pool,
            tft_options=tft_options,
            progress=progress,
        )
        fields = load_targets(masks)
        timings[f"masks_{method}_s"] = time.perf_counter() - stage
        stage = time.perf_counter()
        result = AFTTrainer(model, FASHION_CNN_LAYER, config).fit(
            x_train, y_train, fields["target"], checkpoint=out / f"aft-{method}.ckpt"
        )
        timings[f"aft_{method}_s"] = time.perf_counter() - stage
        aft_model = FashionCNN(width=args.width)
        aft_model.load_state_dict(result.state_dict)
        tuned[method] = aft_model.eval()
        statistics[method] = mask_statistics(fields, result.history)

    # The control: the same fine-tuning without the mask term (any method's targets: unused).
    # Without the mask term the tuner cannot change the network, so its start is fixed.
    stage = time.perf_counter()
    control_config = dataclasses.replace(config, lam=0.0, tuner_init="random")
    control_result = AFTTrainer(model, FASHION_CNN_LAYER, control_config).fit(
        x_train, y_train, fields["target"], checkpoint=out / "control.ckpt"
    )
    control = FashionCNN(width=args.width)
    control.load_state_dict(control_result.state_dict)
    control.eval()
    timings["control_s"] = time.perf_counter() - stage

    stage = time.perf_counter()
    x_metric = x_test[: args.metric_size]
    rows = evaluate_methods(model, tuned, x_metric, FASHION_CNN_LAYER)
    control_rows = evaluate_methods(
        model, dict.fromkeys(tuned, control), x_metric, FASHION_CNN_LAYER, columns=("aft",)
    )
    base_accuracy, tuned_accuracy = accuracy_table(model, tuned, x_test, y_test)
    control_accuracy = accuracy(control, x_test, y_test)
    timings["evaluate_s"] = time.perf_counter() - stage
    timings["total_s"] = time.perf_counter() - started
    tables = {
        "table3": [vars(row) for row in rows],
        "control_table3": [vars(row) for row in control_rows],
        "accuracy": {"original": base_accuracy, **tuned_accuracy, "control": control_accuracy},
        "masks": statistics,
        "timings": timings,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (out / "tables.json").write_text(json.dumps(tables, indent=2))
    print(
        f"Table 3 (miniature): {args.metric_size} Fashion-MNIST test images, binary masks, "
        "top-1 class"
    )
    print(format_table3(rows))
    print()
    print(f"Table 4 (miniature): test accuracy on {len(x_test)} images")
    print(format_table4(base_accuracy, {**tuned_accuracy, "control, lambda=0": control_accuracy}))
    print()
    print("Control: fine-tuned with the same settings and lambda = 0 (no mask term), its maps")
    print("muted like the original column:")
    print(
        "\n".join(
            f"| {row.method} | AvgInc {row.increase['aft']:.3f} | AvgDrop {row.drop['aft']:.3f} |"
            for row in control_rows
        )
    )
    print()
    print("TFT targets and how well the tuner fits them (mask term per epoch vs the targets'")
    print("per-cell variance, i.e. the loss of the best constant map):")
    for method, values in statistics.items():
        print(f"  {method}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    print()
    print("time: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return tables


if __name__ == "__main__":
    run(parse_args())
