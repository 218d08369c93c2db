"""The ``fastxai`` command: ``demo``, ``explain``, ``explain-dataset``, ``aft`` and ``selftest``.

Bad input (a missing image, an unknown method, model or layer) prints one line on stderr and
exits with status 2; missing optional packages exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fastxai.cli.common import (
    ENVIRONMENT_ERROR,
    PROG,
    USAGE_ERROR,
    CliError,
    OneLineParser,
    choose_layer,
    load_model_for_cli,
)
from fastxai.decomposition.present import SRD_METHOD
from fastxai.methods import METHODS

if TYPE_CHECKING:
    import numpy as np
    import torch

    from fastxai.explanation import Explanation
    from fastxai.models import LoadedModel

AM_METHOD = "am"


def build_parser() -> argparse.ArgumentParser:
    from fastxai.demo import DEMO_METHODS, DEMO_PHOTOS
    from fastxai.models import EFFICIENTNET_LITE0

    parser = OneLineParser(prog=PROG, description="CAM-family explanations for PyTorch models.")
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{demo,explain,explain-dataset,aft,selftest}",
        parser_class=OneLineParser,
    )

    demo = commands.add_parser("demo", help="explain EfficientNet-Lite0 on sample photos")
    demo.add_argument("--out", default="fastxai-demo", help="output folder (default: %(default)s)")
    demo.add_argument(
        "--methods",
        nargs="+",
        choices=[*METHODS, SRD_METHOD],
        default=list(DEMO_METHODS),
        metavar="METHOD",
        help=f"default: {' '.join(DEMO_METHODS)}",
    )
    demo.add_argument(
        "--photos",
        nargs="+",
        default=list(DEMO_PHOTOS),
        metavar="NAME",
        help=f"skimage.data photos (default: {' '.join(DEMO_PHOTOS)})",
    )
    demo.add_argument(
        "--per-channel-photos",
        type=int,
        default=1,
        metavar="N",
        help="run scorecam/ablationcam (one forward per channel) on the first N "
        "photos only (default: %(default)s)",
    )
    demo.add_argument(
        "--no-tft",
        dest="tft",
        action="store_false",
        help="skip threshold fine-tuning of the Grad-CAM maps (the TFT overlay and RPI plot)",
    )
    demo.add_argument(
        "--no-am",
        dest="am",
        action="store_false",
        help="skip the Activation Matching panel (about a minute on 2 CPU threads)",
    )
    demo.add_argument("--quiet", action="store_true", help="print nothing")

    explain = commands.add_parser("explain", help="explain images and write overlay PNGs")
    explain.add_argument("images", nargs="+", metavar="IMAGE")
    explain.add_argument(
        "--method",
        choices=[*METHODS, SRD_METHOD, AM_METHOD],
        default="gradcam",
        metavar="NAME",
        help=f"one of {', '.join([*METHODS, SRD_METHOD, AM_METHOD])} (default: %(default)s); "
        "srd needs a torchvision ResNet or VGG, e.g. --model resnet50 --weights FILE; am "
        "(Activation Matching) finds the smallest binary mask that keeps the top-1: about a "
        "minute per image on a CPU (--am-recipe paper: many minutes)",
    )
    explain.add_argument(
        "--out", default="fastxai-out", help="output folder (default: %(default)s)"
    )
    explain.add_argument(
        "--model",
        default=EFFICIENTNET_LITE0,
        help=f"{EFFICIENTNET_LITE0} or a torchvision classifier name such as "
        "resnet18 (default: %(default)s)",
    )
    explain.add_argument(
        "--weights",
        type=Path,
        metavar="STATE_DICT.pt",
        help="state dict for a torchvision model (default: random weights)",
    )
    explain.add_argument(
        "--layer",
        metavar="DOTTED.NAME",
        help="layer to explain (default: the model's last convolutional map)",
    )
    explain.add_argument(
        "--target",
        type=int,
        metavar="CLASS_INDEX",
        help="class to explain (default: each image's top-1)",
    )
    explain.add_argument(
        "--am-recipe",
        choices=("stable", "paper"),
        default="stable",
        help="--method am: the stable area-ladder recipe (default) or the authors' notebook "
        "recipe (seed-dependent)",
    )
    explain.add_argument(
        "--am-steps",
        type=int,
        default=None,
        metavar="N",
        help="--am-recipe paper: training steps (default: the paper's 880)",
    )
    explain.add_argument(
        "--am-restarts",
        type=int,
        default=1,
        metavar="R",
        help="--am-recipe paper: train R generators (seeds) per image together and keep the one "
        "with the lowest final loss (default: %(default)s)",
    )
    explain.add_argument(
        "--tft",
        action="store_true",
        help="also threshold fine-tune the map (fastxai.tft): print tau*, write "
        "<stem>_<method>_tft.png (the kept pixels) and <stem>_<method>_rpi.png (RPI vs threshold)",
    )

    from fastxai.cli.aft import add_parser as add_aft_parser
    from fastxai.cli.dataset import add_parser as add_explain_dataset_parser

    add_explain_dataset_parser(commands)

    add_aft_parser(commands)

    from fastxai.cli.selftest import add_parser as add_selftest_parser

    add_selftest_parser(commands)
    return parser


def run_demo_command(args: argparse.Namespace) -> int:
    from fastxai.demo import check_demo_arguments, run_demo

    try:
        check_demo_arguments(args.methods, args.photos, args.per_channel_photos)
    except ValueError as exc:
        raise CliError(f"--{exc}") from exc
    try:
        run_demo(
            args.out,
            args.methods,
            args.quiet,
            photos=args.photos,
            per_channel_photos=args.per_channel_photos,
            tft=args.tft,
            am=args.am,
        )
    except ImportError as exc:
        raise CliError(str(exc), ENVIRONMENT_ERROR) from exc
    return 0


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from fastxai.models import to_rgb_uint8

    try:
        with Image.open(path) as picture:
            return to_rgb_uint8(picture)
    except (UnidentifiedImageError, OSError) as exc:
        raise CliError(f"IMAGE: cannot read {path} as an image: {exc}") from exc


def _check_image_paths(image_paths: Sequence[Path]) -> None:
    """Every image exists and has its own file stem (overlays are named after the stem)."""
    for path in image_paths:
        if not path.is_file():
            raise CliError(f"IMAGE: no such file: {path}")
    stems = [p.stem for p in image_paths]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise CliError(f"IMAGE: several images named {', '.join(repeated)} would share an overlay")


def explain_image(path: Path, loaded: LoadedModel, layer: str, args: argparse.Namespace) -> None:
    """Explain one image file, write ``<out>/<stem>_<method>.png`` and print the top-1 line.

    With ``--tft``, also TFT on the map for the explained class (the paper's ladder 0.0..0.9):
    ``<stem>_<method>_tft.png`` (:func:`fastxai.viz.tft_overlay`: the map's colours on the kept
    pixels, the image darkened on the muted ones), ``<stem>_<method>_rpi.png`` and a ``tau*`` line.
    """
    import torch

    from fastxai.models import class_name, crop_and_resize
    from fastxai.viz import overlay, save_png

    image = _read_image(path)
    x = loaded.preprocess(image)
    with torch.inference_mode():
        logits = loaded.model(x)
    top1 = int(logits.argmax(dim=1)[0])
    probability = float(logits.softmax(dim=1)[0, top1])
    target = top1 if args.target is None else args.target
    if not 0 <= target < logits.shape[1]:
        raise CliError(f"--target: {target} is not a class index in [0, {logits.shape[1]})")
    if args.method == AM_METHOD:
        if args.tft:
            raise CliError("--tft thresholds CAM maps; --method am already gives a binary mask")
        explain_am(path, loaded, x, image, target, args)
        return
    if args.method == SRD_METHOD:
        from fastxai.decomposition.present import explain_with_srd as method
    else:
        method = METHODS[args.method]
    try:
        explanation = method(loaded.model, x, layer, target)
    except (ValueError, TypeError) as exc:
        raise CliError(f"--method {args.method} at --layer {layer}: {exc}") from exc
    where = "the whole network" if args.method == SRD_METHOD else layer
    display = crop_and_resize(image)
    picture = overlay(display, explanation.maps[0].detach().cpu().numpy())
    written = save_png(picture, Path(args.out) / f"{path.stem}_{args.method}.png")
    if float(explanation.maps.max()) == 0.0:
        raw = explanation.raw
        if raw is not None and tuple(raw.shape[-2:]) == (1, 1):
            why = f"{layer} gives a 1 x 1 map at this input size; try an earlier layer"
        else:
            why = (
                f"its weighted activations at {layer} are all <= 0; try a layer after an "
                "activation function"
            )
        print(
            f"{PROG} explain: warning: {path}: the {args.method} map is zero everywhere ({why})",
            file=sys.stderr,
        )
    print(
        f"{path}: top-1 {top1} {class_name(loaded.class_names, top1)!r} p={probability:.3f}"
        f"; {args.method} for class {target} at {where} -> {written}"
    )
    if args.tft:
        explain_tft(path, loaded, x, explanation, target, logits, display, args)


def explain_am(
    path: Path,
    loaded: LoadedModel,
    x: torch.Tensor,
    image: np.ndarray,
    target: int,
    args: argparse.Namespace,
) -> None:
    """Activation Matching for one image file: ``<stem>_am.png`` (the kept pixels) and a line
    with the kept fraction, the probabilities and whether the top-1 survived. ``--layer`` is not
    used: AM matches its default layers."""
    from fastxai.matching.present import am_line, explain_and_draw
    from fastxai.models import crop_and_resize

    if args.am_steps is not None and args.am_steps < 1:
        raise CliError(f"--am-steps: expected a positive number of steps, got {args.am_steps}")
    if args.am_restarts < 1:
        raise CliError(f"--am-restarts: expected a positive number, got {args.am_restarts}")
    if args.am_recipe != "paper" and (args.am_restarts > 1 or args.am_steps is not None):
        flag = "--am-restarts" if args.am_restarts > 1 else "--am-steps"
        raise CliError(f"{flag}: only --am-recipe paper has it (the stable recipe has no seed)")
    options = {"restarts": args.am_restarts} if args.am_recipe == "paper" else {}
    if args.am_steps is not None:
        options["steps"] = args.am_steps
    try:
        _, summary, written = explain_and_draw(
            loaded.model,
            x,
            crop_and_resize(image),
            Path(args.out) / f"{path.stem}_am.png",
            target=target,
            recipe=args.am_recipe,
            **options,
        )
    except (ValueError, TypeError) as exc:
        raise CliError(f"--method am: {exc}") from exc
    print(
        f"{path}: {am_line(summary, loaded.class_names)} ({summary['time_s']:.0f} s) -> {written}"
    )


def explain_tft(
    path: Path,
    loaded: LoadedModel,
    x: torch.Tensor,
    explanation: Explanation,
    target: int,
    logits: torch.Tensor,
    display: np.ndarray,
    args: argparse.Namespace,
) -> None:
    """TFT on ``explanation``'s map for class ``target``: write the overlay and the RPI plot and
    print ``<image>: <method>+TFT tau*=... RPI=... p ... -> ... (N ms)``."""
    import time

    from fastxai.demo import tft_line, tft_summary
    from fastxai.thresholding import tft
    from fastxai.viz import rpi_plot, save_png, tft_overlay

    start = time.perf_counter()
    # Class-index target (not explanation.targets: methods without a class, such as Eigen-CAM,
    # report -1 there); the logits of the unmodified image are reused.
    tuned = tft(loaded.model, x, explanation.maps, target, logits=logits)
    tft_ms = (time.perf_counter() - start) * 1e3
    summary = tft_summary(tuned)
    out = Path(args.out)
    picture = tft_overlay(
        display, tuned.maps[0].detach().cpu().numpy(), tuned.mask[0].detach().cpu().numpy()
    )
    overlay_path = save_png(picture, out / f"{path.stem}_{args.method}_tft.png")
    plot_path = rpi_plot(
        tuned.extras["thresholds"],
        tuned.rpi[0],
        summary["tau"],
        out / f"{path.stem}_{args.method}_rpi.png",
        title=f"{path.name}: {args.method} + TFT for class {target}",
    )
    print(
        f"{path}: {args.method}+TFT {tft_line(summary)} ({tft_ms:.0f} ms) -> {overlay_path}, "
        f"{plot_path}"
    )


def run_explain_command(args: argparse.Namespace) -> int:
    image_paths = [Path(p) for p in args.images]
    _check_image_paths(image_paths)  # before the model loads
    loaded = load_model_for_cli(args.model, args.weights)
    if args.method == SRD_METHOD:
        from fastxai.decomposition.present import unsupported_model_message

        if message := unsupported_model_message(loaded.model, args.model):
            raise CliError(message)
    layer = choose_layer(args.model, loaded.model, args.layer)
    for path in image_paths:
        explain_image(path, loaded, layer, args)
    return 0


def run_explain_dataset_command(args: argparse.Namespace) -> int:
    from fastxai.cli.dataset import run_explain_dataset_command as run

    return run(args)


def run_aft_command(args: argparse.Namespace) -> int:
    from fastxai.cli.aft import run

    return run(args)


def run_selftest_command(args: argparse.Namespace) -> int:
    from fastxai.cli.selftest import run

    return run(args)


COMMANDS = {
    "demo": run_demo_command,
    "explain": run_explain_command,
    "explain-dataset": run_explain_dataset_command,
    "aft": run_aft_command,
    "selftest": run_selftest_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastxai`` command; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(arguments)
    except SystemExit as exc:  # usage errors and --help: return the status instead of exiting
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    try:
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
