"""``fastxai selftest``: the options of the device self-test (:mod:`fastxai.selftest`)."""

from __future__ import annotations

import argparse
from typing import Any

from fastxai.cli.common import CliError

HELP = "check every fused kernel against the PyTorch reference on every device, then time them"
DESCRIPTION = (
    "Compare every fused kernel with the float64 PyTorch reference on the CPU and every CUDA "
    "device (random and edge inputs, gradients), print one PASS/FAIL line per check and exit "
    "with status 1 on any failure; then, unless --quick, time each kernel against the reference."
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from fastxai.ops._dispatch import OPS
    from fastxai.selftest import DEFAULT_SECONDS, DEVICE_CHOICES

    parser = subparsers.add_parser("selftest", help=HELP, description=DESCRIPTION)
    parser.add_argument(
        "--quick", action="store_true", help="run the checks only, not the benchmark table"
    )
    parser.add_argument(
        "--device",
        choices=DEVICE_CHOICES,
        default="all",
        help="the CPU, every CUDA device, or both (default: %(default)s)",
    )
    parser.add_argument(
        "--ops",
        nargs="+",
        choices=OPS,
        metavar="OP",
        help=f"check only these ops (default: all of {', '.join(OPS)})",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        metavar="S",
        help="time budget of the benchmark table (default: %(default)s)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from fastxai.selftest import NoDeviceError, run_selftest

    if args.seconds < 0:
        raise CliError(f"--seconds must be >= 0, got {args.seconds:g}")
    try:
        return run_selftest(
            device=args.device, ops=args.ops, quick=args.quick, seconds=args.seconds
        )
    except NoDeviceError as exc:
        raise CliError(f"--device {args.device}: {exc}") from exc
