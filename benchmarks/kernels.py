"""All fused-kernel benchmarks in one run: ``python benchmarks/kernels.py [--repeats R]``.

Runs ``kernels_tft.py`` (tft_ladder, rpi_select), ``kernels_cam_priors.py`` (layercam,
mask_priors) and ``kernels_fuse_maps.py`` (fuse_maps) one after the other, each in its own
process with the options given here; each writes its own results file
(``benchmarks/results/kernels_*.json``) and prints its Markdown table. See those files for what
each row compares.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = ("kernels_tft.py", "kernels_cam_priors.py", "kernels_fuse_maps.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-results", action="store_true", help="print the tables only, write no JSON"
    )
    args = parser.parse_args(argv)
    print(f"load at start {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    options = ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    options += ["--no-results"] if args.no_results else []
    failed = []
    for script in SCRIPTS:
        path = Path(__file__).resolve().parent / script
        if subprocess.run([sys.executable, str(path), *options], check=False).returncode:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
