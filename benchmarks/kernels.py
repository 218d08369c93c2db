"""All fused-kernel benchmarks in one run: ``python benchmarks/kernels.py [--repeats R]``.

Runs ``kernels_tft.py`` (tft_ladder, rpi_select), ``kernels_cam_priors.py`` (layercam,
mask_priors) and ``kernels_fuse_maps.py`` (fuse_maps) one after the other and prints their
Markdown tables; see those files for what each row compares.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernels_cam_priors
import kernels_fuse_maps
import kernels_tft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"load at start {os.getloadavg()[0]:.2f}", flush=True)
    print(kernels_tft.markdown(kernels_tft.run(args.repeats, args.threads)), flush=True)
    print(
        kernels_cam_priors.markdown(kernels_cam_priors.run(args.repeats, args.threads)), flush=True
    )
    print(kernels_cam_priors.markdown(kernels_fuse_maps.run(args.repeats, args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
