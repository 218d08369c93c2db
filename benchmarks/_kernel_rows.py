"""Rows shared by the fused-kernel benchmarks (``kernels_*.py``): one row per (workload,
baseline) pair from interleaved samples, its columns, and the command line every kernel script
takes (``--repeats``, ``--threads``, ``--results``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from _results import Results, add_results_option
from _timing import (
    Sample,
    median_cpu_per_wall,
    median_load,
    median_ms,
    paired_ratio,
    trusted_count,
)

from fastxai import ops

THREADS = 2

COLUMNS = [
    ("workload", "workload"),
    ("baseline", "baseline"),
    ("fused_ms", "fused ms", "{:.2f}"),
    ("baseline_ms", "baseline ms", "{:.2f}"),
    ("speedup", "speed-up", "{:.2f}x"),
    ("load_1m", "load 1m", "{:.2f}"),
    ("cpu_wall", "CPU/wall fused, baseline"),
    ("trusted", "trusted rounds"),
]


def summarise(
    workload: str, samples: dict[str, list[Sample]], fused: str, baselines: list[str]
) -> list[dict[str, Any]]:
    """One row per baseline: medians, the same-round speed-up ``baseline / fused``, load, trust."""
    rows = []
    for baseline in baselines:
        mine, theirs = samples[fused], samples[baseline]
        rows.append(
            {
                "workload": workload,
                "baseline": baseline,
                "fused_ms": median_ms(mine),
                "baseline_ms": median_ms(theirs),
                "speedup": paired_ratio(theirs, mine),
                "load_1m": median_load(mine, theirs),
                "cpu_wall": f"{median_cpu_per_wall(mine):.2f}, {median_cpu_per_wall(theirs):.2f}",
                "trusted": trusted_count(mine, theirs),
            }
        )
    return rows


def main(
    script: str,
    description: str,
    run: Callable[[int, int], list[dict[str, Any]]],
    columns: Sequence[Sequence[str]] = COLUMNS,
    argv: list[str] | None = None,
) -> int:
    """Parse the common options, run ``run(repeats, threads)`` and write its rows as table
    ``main`` of the script's results file; the Markdown table goes to stdout."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=15, help="rounds per group (default 15)")
    parser.add_argument(
        "--threads", type=int, default=THREADS, help="torch threads (1 on a busy machine)"
    )
    add_results_option(parser)
    args = parser.parse_args(argv)
    results = Results(script, args.results)
    results.table("main", columns)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.repeats} rounds, extension: "
        f"{ops.extension_status()}",
        file=sys.stderr,
    )
    for row in run(args.repeats, args.threads):
        results.add("main", row)
    results.finish()
    print(results.markdown("main"))
    return 0
