"""``fastxai explain-dataset``: a folder of images -> resumable shards (runs under torchrun)."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fastxai.cli.common import CliError, choose_layer, first_line, load_model_for_cli
from fastxai.methods import METHODS
from fastxai.stream import (
    AUTOCAST_DTYPES,
    FAILED_NAME,
    ImageFiles,
    explain_dataset,
    process_group,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``explain-dataset`` command to ``fastxai``'s sub-command parsers."""
    from fastxai.models import EFFICIENTNET_LITE0

    parser = subparsers.add_parser(
        "explain-dataset",
        help="explain a folder of images into resumable shards (runs under torchrun)",
        description="Explain every image under IMAGE_DIR and write shards of maps (and TFT "
        "masks) to --out through fastxai.io; a killed job resumes where it stopped. Under "
        "torchrun --nproc_per_node=K each rank explains its share and writes its own shards.",
    )
    parser.add_argument("image_dir", metavar="IMAGE_DIR")
    parser.add_argument("--out", required=True, help="output folder of the shards")
    parser.add_argument("--method", choices=list(METHODS), default="gradcam", metavar="NAME")
    parser.add_argument("--model", default=EFFICIENTNET_LITE0)
    parser.add_argument("--weights", type=Path, metavar="STATE_DICT.pt")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights (every rank)")
    parser.add_argument("--layer", metavar="DOTTED.NAME")
    parser.add_argument(
        "--targets",
        choices=["top1", "labels"],
        default="top1",
        help="top-1 class, or the class sub-folder of each image (default: %(default)s)",
    )
    parser.add_argument("--tft", action="store_true", help="threshold fine-tune every map")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--autocast", choices=list(AUTOCAST_DTYPES), help="model passes dtype")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model/input")
    parser.add_argument("--compile", action="store_true", help="torch.compile the explainer")
    parser.add_argument(
        "--strict", action="store_true", help="stop at the first unreadable image (default: skip)"
    )
    parser.add_argument(
        "--restart", action="store_true", help="delete --out's earlier results and start afresh"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def run_explain_dataset_command(args: argparse.Namespace) -> int:
    """``fastxai explain-dataset``: print one summary line per rank; 0 on success."""
    for option in ("batch_size", "shard_size"):
        if getattr(args, option) < 1:
            raise CliError(f"--{option.replace('_', '-')}: must be >= 1")
    if args.num_workers < 0:
        raise CliError("--num-workers: must be >= 0")
    torch.manual_seed(args.seed)  # random weights: the same model on every rank
    loaded = load_model_for_cli(args.model, args.weights)
    model = loaded.model
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)  # our own copy: the CLI loaded it
    layer = choose_layer(args.model, model, args.layer)
    try:
        dataset = ImageFiles(args.image_dir, loaded.preprocess)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if args.targets == "labels" and not dataset.labelled:
        raise CliError("--targets labels: IMAGE_DIR has no class sub-folders")
    with warnings.catch_warnings():  # the summary line below reports unreadable images
        warnings.filterwarnings("ignore", message="explain_dataset: .* could not be read")
        try:
            written = explain_dataset(
                model,
                dataset,
                layer,
                args.out,
                method=args.method,
                targets=args.targets,
                batch_size=args.batch_size,
                tft=args.tft,
                shard_size=args.shard_size,
                num_workers=args.num_workers,
                autocast=AUTOCAST_DTYPES.get(args.autocast or ""),
                memory_format=torch.channels_last if args.channels_last else None,
                compile=args.compile,
                progress=args.progress,
                meta={"model": args.model, "seed": args.seed},
                strict=args.strict,
                restart=args.restart,
            )
        except (ValueError, OSError) as exc:
            raise CliError(first_line(exc)) from exc
    rank, world = process_group(model)
    record = Path(args.out) / FAILED_NAME.format(rank=rank)
    failed = len(json.loads(record.read_text())["failed"]) if record.exists() else 0
    print(
        f"rank {rank}/{world}: {written} images explained -> {args.out}"
        + (f"; {failed} could not be read (listed in {record})" if failed else "")
    )
    if dist.is_available() and dist.is_initialized():
        dist.destroyprocess_group()
    return 1 if failed else 0
