"""Kill-and-resume campaign for ``fastxai explain-dataset`` on a folder with corrupt images.

Writes a folder of random PNGs (``--images``, a few of them truncated), explains it once without
interruption, then explains it again into a second folder while killing the job with SIGKILL at
random moments (``--kills`` times; each run is resumed by the next), finishes it, and compares:

* lost: readable images in neither folder's shards;
* duplicated: images held by more than one shard;
* failed-recorded: unreadable images listed in ``failed-rank0.json`` (should be all of them);
* equal to the clean run: maps and targets bitwise equal, image by image.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dataset_kill_resume.py --out /tmp/kill-resume

``--out`` is the work folder; the result goes to ``benchmarks/results/dataset_kill_resume.json``
(``--results``), rendered by ``benchmarks/tables.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _results import Results, add_results_option

from fastxai.io import read_shards


def write_folder(root: Path, count: int, corrupt: int, seed: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = root / f"class{i % 4}" / f"img{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (96, 112, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    broken = sorted(rng.choice(count, corrupt, replace=False).tolist())
    for i in broken:
        data = paths[i].read_bytes()
        paths[i].write_bytes(data[: len(data) // 3])
    return [paths[i].name for i in broken]


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("rank*-[0-9][0-9][0-9][0-9][0-9][0-9].pt"))


def command(images: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fastxai.cli",
        "explain-dataset",
        str(images),
        "--out",
        str(out),
        "--model",
        "resnet18",
        "--batch-size",
        "4",
        "--shard-size",
        "8",
        "--no-progress",
    ]


COLUMNS = [
    ("kills", "kills"),
    ("runs", "runs"),
    ("lost", "lost"),
    ("duplicated", "duplicated"),
    ("failed_recorded", "unreadable recorded"),
    ("equal", "equal to the clean run"),
    ("clean_s", "clean run s", "{:.0f}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("kill-resume"))
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--corrupt", type=int, default=6)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    add_results_option(parser)
    args = parser.parse_args()
    random.seed(args.seed)
    images, clean, killed = args.out / "images", args.out / "clean", args.out / "killed"
    if not images.exists():
        write_folder(images, args.images, args.corrupt, args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    subprocess.run([*command(images, clean), "--restart"], env=env, capture_output=True)
    clean_seconds = time.perf_counter() - start
    print(f"clean run: {clean_seconds:.1f} s", file=sys.stderr, flush=True)

    runs = kills = 0
    restart = True  # the first run starts afresh; later ones resume
    while kills < args.kills:
        process = subprocess.Popen(
            command(images, killed) + (["--restart"] if restart else []),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        delay = random.uniform(0.2, 1.0) * clean_seconds
        try:
            process.wait(timeout=delay)
            restart = True  # it finished before the kill: start afresh to go on killing
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            restart = False
        runs += 1
        done = sum(len(torch.load(p, weights_only=True)["index"]) for p in shards(killed))
        state = "killed" if process.returncode < 0 else f"finished (exit {process.returncode})"
        print(f"run {runs}: {state} after {delay:.1f} s; {done} images in shards", file=sys.stderr)
    final = subprocess.run(command(images, killed), env=env, capture_output=True, text=True)
    print(f"final run: exit {final.returncode}: {final.stdout.strip()}", file=sys.stderr)

    want, got = read_shards(clean), read_shards(killed)
    indices = torch.cat([torch.load(p, weights_only=True)["index"] for p in shards(killed)])
    duplicated = int(indices.numel() - indices.unique().numel())
    failed = json.loads((killed / "failed-rank0.json").read_text())["failed"]
    readable = set(range(args.images)) - {f["index"] for f in failed}
    lost = len(readable - set(got["index"].tolist()))
    equal = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    results = Results(__file__, args.results)
    results.table("main", COLUMNS)
    results.add(
        "main",
        {
            "kills": kills,
            "runs": runs,
            "lost": lost,
            "duplicated": duplicated,
            "failed_recorded": f"{len(failed)} / {args.corrupt}",
            "equal": "yes, bitwise (maps, targets)" if equal else "no",
            "clean_s": clean_seconds,
        },
    )
    results.finish()
    print(results.markdown("main"))


if __name__ == "__main__":
    main()
