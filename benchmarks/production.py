"""Production numbers on the CPU: compiled vs eager explainers, and stream throughput.

Part ``compile`` (resnet50 ``layer4``, Grad-CAM, batch 1 and 8, 224 x 224): four contenders timed
in interleaved rounds with the harness of ``cam_methods.py`` (medians, load, CPU/wall):

* ``eager floor``: forward + gradient of the top-1 logit to the layer, the faster of the hook and
  the vjp floor of ``cam_methods.py``;
* ``eager``: ``fastxai.nn.Explainer(model, "layer4")(x)`` (map, logits; forward included);
* ``compiled floor``: the vjp floor under ``torch.compile(fullgraph=True)``;
* ``compiled``: ``torch.compile(Explainer(...), fullgraph=True)``.

Compile time (the first call of each compiled function) is reported separately. Targets of issue 8:
at batch 1 ``compiled < eager floor``; at batch 8 ``compiled <= 1.05 x compiled floor``.
``--freezing`` turns on Inductor's freezing (weights folded as constants) for every compiled
contender, ``--channels-last`` runs every contender on a channels_last copy of the model.

Part ``stream``: :func:`fastxai.stream.explain_stream` over ``--images`` random images, Grad-CAM
(eager), batch 1, 8 and 32: images per second (median of rounds), and at batch 1 the per-call
latency percentiles p50 / p95; ``--tft`` adds Grad-CAM + TFT at batch 8.

Run ``python benchmarks/production.py [--only compile,stream] [--repeats R] [--out FILE]``; wrap
it in ``flock /tmp/fastxai-bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import statistics
import sys
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cam_methods import (
    SIZE,
    THREADS,
    Contender,
    hook_floor,
    measure,
    pick_floor,
    torchvision_model,
    vjp_floor,
)

import fastxai
from fastxai.capture import get_split
from fastxai.nn import Explainer
from fastxai.stream import explain_stream

LAYER = "layer4"


def compiled_floor(model: nn.Module, x: Tensor) -> tuple[Contender, float]:
    """The vjp floor under torch.compile(fullgraph=True); returns it and its compile time (s)."""
    split = get_split(model, LAYER)
    assert split is not None

    def floor(images: Tensor) -> Tensor:
        with torch.no_grad():
            a, *carry = split.prefix(images)
            logits, vjp_fn = torch.func.vjp(lambda t: split.suffix(t, *carry), a)
            top1 = logits.argmax(1, keepdim=True)
            (g,) = vjp_fn(torch.zeros_like(logits).scatter_(1, top1, 1.0))
        return g

    compiled = torch.compile(floor, fullgraph=True)
    start = time.perf_counter()
    compiled(x)
    return Contender("compiled floor", lambda: compiled(x)), time.perf_counter() - start


def compiled_explainer(model: nn.Module, x: Tensor) -> tuple[Contender, float]:
    compiled = torch.compile(Explainer(model, LAYER), fullgraph=True)
    start = time.perf_counter()
    compiled(x)
    return Contender("compiled", lambda: compiled(x)[1].maps), time.perf_counter() - start


def compile_rows(model: nn.Module, x: Tensor, repeats: int) -> dict[str, Any]:
    eager = Explainer(model, LAYER)
    floor_c, floor_compile_s = compiled_floor(model, x)
    explain_c, explain_compile_s = compiled_explainer(model, x)
    contenders = [
        hook_floor(model, LAYER, x),
        vjp_floor(model, LAYER, x),
        Contender("eager", lambda: eager(x)[1].maps),
        floor_c,
        explain_c,
    ]
    m = measure(contenders, repeats)
    floor_name, floor_kind = pick_floor(m)
    error = (m.outputs["compiled"] - m.outputs["eager"]).abs().max().item()
    return {
        "batch": x.shape[0],
        "eager floor ms": m.median_ms(floor_name),
        "floor kind": floor_kind,
        "eager ms": m.median_ms("eager"),
        "compiled floor ms": m.median_ms("compiled floor"),
        "compiled ms": m.median_ms("compiled"),
        "compiled / eager floor": m.paired_ratio("compiled", floor_name),
        "compiled / compiled floor": m.paired_ratio("compiled", "compiled floor"),
        "eager / eager floor": m.paired_ratio("eager", floor_name),
        "compile s (floor, explainer)": (floor_compile_s, explain_compile_s),
        "max |compiled - eager|": error,
        "cpu/wall": m.cpu_ratio("compiled"),
        "trusted": m.trusted_count("compiled"),
        "load": m.load(),
    }


def stream_rows(
    model: nn.Module, count: int, repeats: int, batches: list[int], tft: bool
) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(count, 3, SIZE, SIZE, generator=gen)
    rows = []
    for batch in batches:
        rates, latencies, ratios = [], [], []
        for _ in range(repeats):
            stamps = [time.perf_counter()]
            c0, t0 = time.process_time(), time.perf_counter()
            for _explanation in explain_stream(
                model, images, LAYER, batch_size=batch, tft=tft, progress=False
            ):
                stamps.append(time.perf_counter())
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rates.append(count / wall)
            ratios.append(cpu / wall)
            latencies += [b - a for a, b in itertools.pairwise(stamps)]
        row = {
            "method": "gradcam+tft" if tft else "gradcam",
            "batch": batch,
            "images/s": statistics.median(rates),
            "cpu/wall": statistics.median(ratios),
            "load": os.getloadavg()[0],
        }
        if batch == 1:
            ordered = sorted(latencies)
            row["p50 ms"] = 1e3 * ordered[len(ordered) // 2]
            row["p95 ms"] = 1e3 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    return rows


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value < 10 else f"{value:.0f}"
    if isinstance(value, tuple):
        return " / ".join(fmt(v) for v in value)
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="compile,stream", help="compile, stream or both")
    parser.add_argument("--model", default="resnet50", help="torchvision model (layer4)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=64, help="images per stream round")
    parser.add_argument("--batches", default="1,8", help="compile part: batch sizes")
    parser.add_argument("--freezing", action="store_true", help="Inductor freezing on")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model/input")
    parser.add_argument("--tft", action="store_true", help="stream: also Grad-CAM + TFT, batch 8")
    parser.add_argument("--out", default=None, help="also write the tables here")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    if args.freezing:
        torch._inductor.config.freezing = True
    only = set(args.only.split(","))
    model = torchvision_model(args.model)
    fmt_ = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt_)
    start_load = os.getloadavg()[0]
    text = []
    if "compile" in only:
        gen = torch.Generator().manual_seed(0)
        rows = []
        for n in [int(b) for b in args.batches.split(",")]:
            x = torch.randn(n, 3, SIZE, SIZE, generator=gen).contiguous(memory_format=fmt_)
            rows.append(compile_rows(model, x, args.repeats))
            print(rows[-1], file=sys.stderr, flush=True)
        text.append(table(rows))
    if "stream" in only:
        rows = stream_rows(model, args.images, args.repeats, [1, 8, 32], tft=False)
        if args.tft:
            rows += stream_rows(model, args.images // 4, args.repeats, [8], tft=True)
        text.append(table(rows))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = "python benchmarks/production.py " + " ".join(sys.argv[1:] if argv is None else argv)
    footer = (
        f"{stamp}; torch {torch.__version__}, {THREADS} threads, {os.cpu_count()} cores; "
        f"fastxai ext {fastxai.has_extension()}; load at start {start_load:.2f}, at end "
        f"{os.getloadavg()[0]:.2f}; freezing {args.freezing}; channels_last "
        f"{args.channels_last}; `{command.strip()}`"
    )
    report = "\n\n".join([*text, footer]) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
