"""Production numbers on the CPU: compiled vs eager explainers, and stream throughput.

Part ``compile`` (resnet50 ``layer4``, Grad-CAM, batch 1 and 8, 224 x 224): four contenders timed
in interleaved rounds with the harness of ``cam_methods.py`` (medians, load, CPU/wall):

* ``eager floor``: forward + gradient of the top-1 logit to the layer, the faster of the hook and
  the vjp floor of ``cam_methods.py``;
* ``eager``: ``fastxai.nn.Explainer(model, "layer4")(x)`` (map, logits; forward included);
* ``compiled floor``: the vjp floor under ``torch.compile(fullgraph=True)``;
* ``compiled``: ``torch.compile(Explainer(...), fullgraph=True)``.

Compile time (the first call of each compiled function) is reported separately. Targets: at
batch 1 ``compiled < eager floor``; at batch 8 ``compiled <= 1.05 x compiled floor``.
``--freezing`` turns on Inductor's freezing (weights folded as constants) for every compiled
contender, ``--channels-last`` runs every contender on a channels_last copy of the model.

Part ``stream``: :func:`fastxai.stream.explain_stream` over ``--images`` random images, Grad-CAM
(eager), batch 1, 8 and 32: images per second (median of rounds), and at batch 1 the per-call
latency percentiles p50 / p95; ``--tft`` adds Grad-CAM + TFT at batch 8.

Run ``python benchmarks/production.py [--only compile,stream] [--repeats R]``; wrap it in
``flock /tmp/fastxai-bench.lock`` on a shared machine. The rows go to tables ``compile`` and
``stream`` of ``benchmarks/results/production.json`` (``--results``), rendered by
``benchmarks/tables.py``.
"""

from __future__ import annotations

import argparse
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

from _contenders import (
    SIZE,
    THREADS,
    Contender,
    hook_floor,
    measure,
    pick_floor,
    torchvision_model,
    vjp_floor,
)
from _results import Results, add_results_option

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


COMPILE_COLUMNS = [
    ("batch", "N"),
    ("memory_format", "memory format"),
    ("eager_floor", "eager floor ms"),
    ("eager_ms", "eager ms", "{:.0f}"),
    ("compiled_floor_ms", "compiled floor ms", "{:.0f}"),
    ("compiled_ms", "compiled ms", "{:.0f}"),
    ("compiled_vs_eager_floor", "compiled / eager floor", "{:.3g}"),
    ("compiled_vs_compiled_floor", "compiled / compiled floor", "{:.3g}"),
    ("eager_vs_eager_floor", "eager / eager floor", "{:.3g}"),
    ("compile_s", "compile s (floor / explainer)"),
    ("max_diff", "max abs diff", "{:.1e}"),
    ("cpu", "CPU/wall", "{:.2f}"),
    ("trusted", "trusted"),
    ("load", "load 1m", "{:.2f}"),
]
STREAM_COLUMNS = [
    ("method", "method"),
    ("batch", "batch"),
    ("images_per_s", "images/s", "{:.3g}"),
    ("latency", "batch-1 latency"),
    ("cpu", "CPU/wall", "{:.2f}"),
    ("load", "load 1m", "{:.2f}"),
]


def compile_row(model: nn.Module, x: Tensor, repeats: int, memory_format: str) -> dict[str, Any]:
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
    floor_name, _ = pick_floor(m)
    other = "floor_hook" if floor_name == "floor_vjp" else "floor_vjp"
    eager_floor = (
        f"{m.median_ms(floor_name):.0f} ({floor_name[6:]}; {other[6:]} {m.median_ms(other):.0f})"
    )
    error = (m.outputs["compiled"] - m.outputs["eager"]).abs().max().item()
    trusted, total = m.trusted_count("compiled")
    return {
        "batch": x.shape[0],
        "memory_format": memory_format,
        "eager_floor": eager_floor,
        "eager_ms": m.median_ms("eager"),
        "compiled_floor_ms": m.median_ms("compiled floor"),
        "compiled_ms": m.median_ms("compiled"),
        "compiled_vs_eager_floor": m.paired_ratio("compiled", floor_name),
        "compiled_vs_compiled_floor": m.paired_ratio("compiled", "compiled floor"),
        "eager_vs_eager_floor": m.paired_ratio("eager", floor_name),
        "compile_s": f"{floor_compile_s:.2g} / {explain_compile_s:.2g}",
        "max_diff": error,
        "cpu": m.cpu_ratio("compiled"),
        "trusted": f"{trusted}/{total}",
        "load": m.load(),
    }


def stream_rows(
    model: nn.Module, count: int, repeats: int, batches: list[int], tft: bool
) -> list[dict[str, Any]]:
    """``explain_stream`` throughput per batch size; latency percentiles at batch 1."""
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
        latency = ""
        if batch == 1:
            ordered = sorted(latencies)
            p50 = 1e3 * ordered[len(ordered) // 2]
            p95 = 1e3 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            latency = f"p50 {p50:.0f} ms, p95 {p95:.0f} ms"
        rows.append(
            {
                "method": "gradcam+tft" if tft else "gradcam",
                "batch": batch,
                "images_per_s": statistics.median(rates),
                "latency": latency,
                "cpu": statistics.median(ratios),
                "load": os.getloadavg()[0],
            }
        )
    return rows


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
    add_results_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    if args.freezing:
        torch._inductor.config.freezing = True
    only = set(args.only.split(","))
    model = torchvision_model(args.model)
    fmt_ = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt_)
    results = Results(__file__, args.results)
    if "compile" in only:
        results.table("compile", COMPILE_COLUMNS)
        gen = torch.Generator().manual_seed(0)
        for n in [int(b) for b in args.batches.split(",")]:
            x = torch.randn(n, 3, SIZE, SIZE, generator=gen).contiguous(memory_format=fmt_)
            format_name = "channels_last" if args.channels_last else "contiguous"
            results.add("compile", compile_row(model, x, args.repeats, format_name))
            print(results.data["tables"]["compile"]["rows"][-1], file=sys.stderr, flush=True)
    if "stream" in only:
        results.table("stream", STREAM_COLUMNS)
        rows = stream_rows(model, args.images, args.repeats, [1, 8, 32], tft=False)
        if args.tft:
            rows += stream_rows(model, args.images // 4, args.repeats, [8], tft=True)
        for row in rows:
            results.add("stream", row)
            print(row, file=sys.stderr, flush=True)
    results.finish()
    print("\n\n".join(results.markdown(name) for name in results.data["tables"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
