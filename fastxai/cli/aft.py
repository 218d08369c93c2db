"""``fastxai aft pretrain | prepare | train | evaluate``: AFT on Fashion-MNIST from the shell.

``prepare`` and ``train`` run unchanged under ``torchrun --nproc_per_node=N`` (gloo on CPU, nccl
on GPU). Weights files are plain state dicts of :class:`~fastxai.aft.FashionCNN` (``--width``
must match). Errors print one line; a missing dataset or file exits with 1, bad arguments with 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from fastxai import distributed
from fastxai.cli.common import ENVIRONMENT_ERROR, USAGE_ERROR, first_line

SUBCOMMANDS = ("pretrain", "prepare", "train", "evaluate")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=int, default=16, help="CNN width (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument(
        "--device", default=None, help="cpu or cuda (default: cuda if available, per local rank)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``aft`` and its subcommands to the ``fastxai`` command's subparsers."""
    from fastxai.methods import METHODS

    aft = subparsers.add_parser(
        "aft", help="activation fine-tuning on Fashion-MNIST (pretrain, prepare, train, evaluate)"
    )
    commands = aft.add_subparsers(
        dest="aft_command",
        required=True,
        metavar="{" + ",".join(SUBCOMMANDS) + "}",
        parser_class=type(aft),
    )
    pretrain = commands.add_parser("pretrain", help="train the small CNN (Adam, cross-entropy)")
    pretrain.add_argument("--out", type=Path, required=True, metavar="MODEL.pt")
    pretrain.add_argument("--epochs", type=int, default=3)
    pretrain.add_argument("--batch-size", type=int, default=128)
    pretrain.add_argument("--lr", type=float, default=1e-3)
    pretrain.add_argument("--train-size", type=int, default=60000, help="first N images")
    _common(pretrain)

    prepare = commands.add_parser("prepare", help="TFT masks of the training images (resumable)")
    prepare.add_argument("--weights", type=Path, required=True, metavar="MODEL.pt")
    prepare.add_argument("--out", type=Path, required=True, metavar="MASK_DIR")
    prepare.add_argument("--method", choices=list(METHODS), default="gradcam")
    prepare.add_argument("--layer", default="layer3")
    prepare.add_argument("--target", choices=["pred", "label"], default="pred")
    prepare.add_argument("--pool", choices=["avg", "nearest"], default="avg")
    prepare.add_argument("--batch-size", type=int, default=256)
    prepare.add_argument("--shard-size", type=int, default=4096)
    prepare.add_argument("--train-size", type=int, default=60000, help="first N images")
    prepare.add_argument(
        "--restart", action="store_true", help="delete MASK_DIR's earlier masks and start afresh"
    )
    _common(prepare)

    train = commands.add_parser("train", help="AFT (Eq. 8); checkpoints each epoch, resumes")
    train.add_argument("--weights", type=Path, required=True, metavar="MODEL.pt")
    train.add_argument("--masks", type=Path, required=True, metavar="MASK_DIR")
    train.add_argument("--out", type=Path, required=True, metavar="AFT_MODEL.pt")
    train.add_argument("--checkpoint", type=Path, help="default: AFT_MODEL.pt.ckpt")
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--batch-size", type=int, default=64, help="global batch")
    train.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd")
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--momentum", type=float, default=0.9)
    train.add_argument("--weight-decay", type=float, default=1e-4)
    train.add_argument("--lam", type=float, default=1.0, help="lambda of Eq. 8")
    train.add_argument("--reduction", choices=["mean", "sum"], default="mean")
    train.add_argument("--linear", action="store_true", help="tuner without ReLU and sigmoid")
    train.add_argument(
        "--tuner-init",
        choices=["random", "mean"],
        default="random",
        help="tuner start: random, or the constant mean of the targets",
    )
    train.add_argument("--compile", action="store_true", help="torch.compile the loss")
    _common(train)

    evaluate = commands.add_parser("evaluate", help="print Tables 3 and 4 (miniature)")
    evaluate.add_argument("--weights", type=Path, required=True, metavar="MODEL.pt")
    evaluate.add_argument(
        "--aft",
        nargs="+",
        required=True,
        metavar="METHOD=AFT_MODEL.pt",
        help="each AFT model with the CAM method its masks were made with",
    )
    evaluate.add_argument("--layer", default="layer3")
    evaluate.add_argument("--test-size", type=int, default=10000, help="images for accuracy")
    evaluate.add_argument("--metric-size", type=int, default=2000, help="images for Table 3")
    _common(evaluate)
    return aft


class _Failure(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _model(width: int, weights: Path | None, device: torch.device) -> torch.nn.Module:
    from fastxai.aft.models import FashionCNN

    model = FashionCNN(width=width)
    if weights is not None:
        if not weights.is_file():
            raise _Failure(f"--weights: no such file: {weights}", ENVIRONMENT_ERROR)
        try:
            with warnings.catch_warnings():  # torch's own pickle-protocol warning
                warnings.simplefilter("ignore")
                state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # not a torch file, truncated, or an unsafe pickle
            first = first_line(exc)
            raise _Failure(
                f"--weights: {weights} is not a loadable state dict ({first[:160]})", USAGE_ERROR
            ) from None
        try:
            model.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
            first = first_line(exc)
            raise _Failure(
                f"--weights: {weights} does not fit --width {width}: {first}", USAGE_ERROR
            ) from exc
    return model.to(device).eval()


def _data(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from fastxai.aft.data import load_fashion_mnist, normalise

    if size < 1:
        raise _Failure(f"--{split}-size must be >= 1, got {size}", USAGE_ERROR)
    try:
        images, labels = load_fashion_mnist(split)  # type: ignore[arg-type]
    except FileNotFoundError as exc:
        raise _Failure(str(exc), ENVIRONMENT_ERROR) from exc
    return normalise(images[:size]), labels[:size]


def _pretrain(args: argparse.Namespace) -> None:
    from fastxai.aft.models import accuracy, train_classifier
    from fastxai.io import atomic_save

    torch.manual_seed(args.seed)
    x, y = _data("train", args.train_size)
    device = distributed.parse_device(args.device or "cpu")
    model = _model(args.width, None, device)
    train_classifier(
        model,
        x.to(device),
        y.to(device),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=not args.quiet,
    )
    atomic_save(model.cpu().state_dict(), args.out)
    print(f"training accuracy {accuracy(model, x, y):.4f} -> {args.out}")


def _prepare(args: argparse.Namespace) -> None:
    from fastxai.aft.masks import generate_masks

    ctx = distributed.init_from_env(args.device)
    try:
        model = _model(args.width, args.weights, ctx.device)
        x, y = _data("train", args.train_size)
        job = generate_masks(
            model,
            x,
            args.out,
            layer=args.layer,
            method=args.method,
            labels=y,
            target=args.target,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            pool=args.pool,
            context=ctx,
            progress=not args.quiet,
            restart=args.restart,
        )
        print(
            f"rank {ctx.rank}: {job.computed} masks computed, {job.skipped} already done "
            f"-> {args.out}"
        )
    finally:
        distributed.shutdown()


def _train(args: argparse.Namespace) -> None:
    from fastxai.aft.masks import load_targets
    from fastxai.aft.trainer import AFTConfig, AFTTrainer
    from fastxai.io import atomic_save, read_meta

    meta = read_meta(args.masks)
    if not meta:
        raise _Failure(
            f"--masks: {args.masks} holds no mask job (run `fastxai aft prepare`)",
            ENVIRONMENT_ERROR,
        )
    config = AFTConfig(
        lam=args.lam,
        reduction=args.reduction,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        linear=args.linear,
        tuner_init=args.tuner_init,
        compile=args.compile,
        progress=not args.quiet,
    )
    ctx = distributed.init_from_env(args.device)
    try:
        model = _model(args.width, args.weights, ctx.device)
        fields = load_targets(args.masks)
        x, y = _data("train", int(meta["num_items"]))
        checkpoint = args.checkpoint or args.out.with_name(args.out.name + ".ckpt")
        result = AFTTrainer(model, meta["layer"], config, ctx).fit(
            x, y, fields["target"], checkpoint=checkpoint
        )
        if ctx.is_main:
            atomic_save({k: v.cpu() for k, v in result.state_dict.items()}, args.out)
            last = result.history[-1] if result.history else {}
            print(
                f"AFT ({meta['method']} masks, layer {meta['layer']}): last epoch {last} "
                f"-> {args.out}"
            )
    finally:
        distributed.shutdown()


def _evaluate(args: argparse.Namespace) -> None:
    from fastxai.aft.evaluate import accuracy_table, evaluate_methods, format_table3, format_table4
    from fastxai.methods import METHODS

    device = distributed.parse_device(args.device or "cpu")
    original = _model(args.width, args.weights, device)
    tuned = {}
    for pair in args.aft:
        method, sep, path = pair.partition("=")
        if not sep or method not in METHODS:
            raise _Failure(
                f"--aft: expected METHOD=PATH with METHOD in {sorted(METHODS)}, got {pair!r}",
                USAGE_ERROR,
            )
        tuned[method] = _model(args.width, Path(path), device)
    x, y = _data("test", args.test_size)
    x, y = x.to(device), y.to(device)
    rows = evaluate_methods(original, tuned, x[: args.metric_size], args.layer)
    print(format_table3(rows))
    print()
    print(format_table4(*accuracy_table(original, tuned, x, y)))


_RUNNERS = {"pretrain": _pretrain, "prepare": _prepare, "train": _train, "evaluate": _evaluate}


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``fastxai aft ...`` command; returns the exit status."""
    try:
        _RUNNERS[args.aft_command](args)
    except _Failure as exc:
        print(f"fastxai aft {args.aft_command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ValueError, OSError) as exc:
        first = first_line(exc)
        print(f"fastxai aft {args.aft_command}: error: {first}", file=sys.stderr)
        return USAGE_ERROR
    return 0
