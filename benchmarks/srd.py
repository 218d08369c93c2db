"""CPU time and peak memory of SRD against one forward plus one backward to the input.

For each batch size, ``fastxai.srd(model, x)`` (contrastive rule, top-1 class, fast form) and
the *floor* run interleaved (A B A B ...): the floor is one forward and one backward of the top-1
logits to the input with every parameter frozen (``requires_grad_(False)`` on a private copy of the
model, so no parameter gradients are formed). The ratio is the median over rounds of
``srd / floor`` in the same round, over the rounds where both samples had both threads (CPU time
>= 1.7 x wall time; all rounds when none did); milliseconds are medians over the same rounds.
Each sample records
``os.getloadavg()[0]`` and process CPU time over wall time (about 2 when both threads ran).

Peak memory: each contender runs in a fresh interpreter with ``MALLOC_MMAP_THRESHOLD_=65536``, so
every block of 64 KiB or more is its own mapping and goes back to the kernel when torch frees it
(RSS then follows the live tensors instead of glibc's retained heap). After the model and input
are built and one warm-up call has run, the RSS high-water mark is reset
(``/proc/self/clear_refs``) and ``VmHWM`` after one more call minus ``VmRSS`` before it is the
reported peak: the most memory the call held at once beyond what was already resident (the model,
the input). torch's CPU allocator keeps no statistics of its own, and ``tracemalloc`` does not
see its allocations.

Run ``python benchmarks/srd.py [--model resnet50] [--size 224] [--batches 1 8] [--repeats 5]``;
``--quick`` is 3 repeats. Progress goes to stderr, the Markdown table to stdout, the rows to
``benchmarks/results/srd.json`` (``--results``), rendered by ``benchmarks/tables.py``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from _results import Results, add_results_option  # noqa: E402
from _timing import (  # noqa: E402
    Sample,
    interleave,
    kept_pairs,
    median_load,
    paired_ratio,
    trusted_count,
)

from fastxai.decomposition import srd  # noqa: E402

THREADS = 2
COLUMNS = [
    ("model", "model"),
    ("batch", "batch"),
    ("floor_ms", "floor ms", "{:.0f}"),
    ("srd_ms", "srd ms", "{:.0f}"),
    ("ratio", "srd/floor", "{:.2f}x"),
    ("peak_mb", "peak MB floor / srd"),
    ("load", "load", "{:.2f}"),
    ("cpu", "cpu/wall"),
    ("trusted", "trusted rounds"),
]


def build_model(name: str) -> nn.Module:
    """Random-weight torchvision model in eval mode with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=1000)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
    return model.eval()


def contenders(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    frozen = copy.deepcopy(model).requires_grad_(False)

    def floor() -> torch.Tensor:
        leaf = x.detach().requires_grad_(True)
        logits = frozen(leaf)
        score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(score, leaf)
        return grad

    def run_srd() -> torch.Tensor:
        return srd(model, x).maps

    return {"floor": floor, "srd": run_srd}


def time_interleaved(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, Any]:
    def report(name: str, sample: Sample) -> None:
        print(
            f"  {name}: {1e3 * sample.wall:.0f} ms, cpu/wall {sample.cpu_per_wall:.2f}, "
            f"load {sample.load:.2f}",
            file=sys.stderr,
        )

    samples = interleave(contenders(model, x), repeats, rotate=False, report=report)
    pairs = kept_pairs(samples["srd"], samples["floor"])
    kept = {"srd": [s for s, _ in pairs], "floor": [f for _, f in pairs]}
    return {
        name: {
            "ms": 1e3 * statistics.median(s.wall for s in runs),
            "cpu_per_wall": statistics.median(s.cpu_per_wall for s in runs),
            "load": median_load(runs),
        }
        for name, runs in kept.items()
    } | {
        "ratio": paired_ratio(samples["srd"], samples["floor"]),
        "rounds": trusted_count(samples["srd"], samples["floor"]),
    }


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe_memory(name: str, model_name: str, size: int, batch: int) -> None:
    """In this (fresh) process: peak RSS increase of one call of contender ``name``, as JSON."""
    torch.set_num_threads(THREADS)
    model = build_model(model_name)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    fn = contenders(model, x)[name]
    fn()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_mb": (peak - before) / 1024}))


def measure_memory(name: str, model_name: str, size: int, batch: int) -> float | None:
    command = [
        sys.executable,
        __file__,
        "--probe",
        name,
        "--model",
        model_name,
        "--size",
        str(size),
        "--batches",
        str(batch),
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        print(f"  memory probe {name} failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--probe", choices=["floor", "srd"], help=argparse.SUPPRESS)
    add_results_option(parser)
    args = parser.parse_args()
    if args.probe:
        probe_memory(args.probe, args.model, args.size, args.batches[0])
        return
    torch.set_num_threads(THREADS)
    repeats = 3 if args.quick else args.repeats
    model = build_model(args.model)
    print(
        f"SRD benchmark: {args.model} {args.size}x{args.size}, {THREADS} threads, "
        f"repeats {repeats}, load at start {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
    )
    results = Results(__file__, args.results)
    results.table("main", COLUMNS)
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        print(f"batch {batch}", file=sys.stderr)
        t = time_interleaved(model, x, repeats)
        peak = "-"
        if not args.no_memory:
            floor_mb, srd_mb = (
                measure_memory(name, args.model, args.size, batch) for name in ("floor", "srd")
            )
            peak = " / ".join("-" if v is None else f"{v:.0f}" for v in (floor_mb, srd_mb))
        results.add(
            "main",
            {
                "model": f"{args.model} {args.size}",
                "batch": batch,
                "floor_ms": t["floor"]["ms"],
                "srd_ms": t["srd"]["ms"],
                "ratio": t["ratio"],
                "peak_mb": peak,
                "load": t["srd"]["load"],
                "cpu": f"{t['floor']['cpu_per_wall']:.2f}/{t['srd']['cpu_per_wall']:.2f}",
                "trusted": t["rounds"],
            },
        )
    results.finish()
    print(results.markdown("main"))


if __name__ == "__main__":
    main()
