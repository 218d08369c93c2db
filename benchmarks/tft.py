"""CPU timings of ``fastxai.gradcam(..., tft=True)`` against its floor and peer-plus-loop baselines.

Floor: forward + gradient of the top-1 logit to the layer (the cheaper of the two floors of
``cam_methods.py``) plus the forward of the ladder's ``N * T`` masked images in one batch
(chunked like fastxai), masked images built outside the timing. Peers: pytorch-grad-cam 1.5.7 and
torchcam 0.5.0 give the map; a Python loop over the 10 thresholds then masks the batch and runs
one forward per threshold (what a user of those libraries writes). Same harness as
``cam_methods.py``: interleaved rounds, medians, load and CPU/wall recorded.

Run ``python benchmarks/tft.py [--quick] [--repeats R]``; the rows go to
``benchmarks/results/tft.json`` (``--results``), rendered by ``benchmarks/tables.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
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
    pgc_contender,
    pick_floor,
    torchcam_contender,
    torchvision_model,
    vjp_floor,
)
from _results import Results, add_results_option

import fastxai
from fastxai._batching import rows_per_batch
from fastxai.thresholding import PAPER_THRESHOLDS, ladder_masks

LAYER = "layer4"


def ladder_batch(maps: Tensor, x: Tensor) -> Tensor:
    masks = ladder_masks(maps, torch.tensor(PAPER_THRESHOLDS, dtype=maps.dtype), "value")
    return (masks.to(x.dtype)[:, :, None] * x[:, None]).flatten(0, 1)


def forward_chunks(model: nn.Module, images: Tensor) -> Tensor:
    rows = rows_per_batch(images, None)
    with torch.inference_mode():
        return torch.cat([model(images[s : s + rows]) for s in range(0, len(images), rows)])


def with_threshold_loop(inner: Contender, model: nn.Module, x: Tensor) -> Contender:
    """A peer's map, then one masked forward per threshold (softmax, RPI, first argmax)."""

    def run() -> Tensor:
        maps = torch.as_tensor(inner.run()).float()
        with torch.inference_mode():
            probs = torch.softmax(model(x), 1)
            c = probs.argmax(1, keepdim=True)
            p0 = probs.gather(1, c)
            rpis = []
            for tau in PAPER_THRESHOLDS:
                keep = ((maps >= tau) & (maps > 0)).to(x.dtype)
                p = torch.softmax(model(x * keep[:, None]), 1).gather(1, c)
                rpis.append((p - p0).clamp_min(0) / p0)
        return torch.cat(rpis, 1)

    return Contender(inner.name, run, inner.setup, inner.teardown)


COLUMNS = [
    ("method", "method"),
    ("where", "model/layer"),
    ("batch", "N"),
    ("fastxai_ms", "fastxai ms", "{:.0f}"),
    ("floor_ms", "floor ms", "{:.0f}"),
    ("floor_kind", "gradient floor"),
    ("fx_ratio", "fastxai/floor"),
    ("pgc_ratio", "pgc+loop/floor"),
    ("tc_ratio", "torchcam+loop/floor"),
    ("load", "load 1m", "{:.2f}"),
    ("cpu", "CPU/wall", "{:.2f}"),
    ("rpi_agrees", "RPI = pgc+loop (1e-4)"),
]


def tft_row(model: nn.Module, x: Tensor, repeats: int) -> dict[str, Any]:
    maps = fastxai.gradcam(model, x, LAYER).maps
    masked = ladder_batch(maps, x)
    grad_hook, grad_vjp = hook_floor(model, LAYER, x), vjp_floor(model, LAYER, x)

    def floor_run(grad: Contender) -> Tensor:
        if grad.setup:
            grad.setup()
        try:
            grad.run()
        finally:
            if grad.teardown:
                grad.teardown()
        return forward_chunks(model, masked)

    contenders = [
        Contender("fastxai", lambda: fastxai.gradcam(model, x, LAYER, tft=True)),
        Contender("floor_hook", lambda: floor_run(grad_hook)),
        Contender("floor_vjp", lambda: floor_run(grad_vjp)),
        with_threshold_loop(pgc_contender("GradCAM", model, LAYER, x), model, x),
        with_threshold_loop(torchcam_contender("GradCAM", model, LAYER, x), model, x),
    ]
    m = measure(contenders, repeats)
    floor, kind = pick_floor(m)
    agree = torch.allclose(m.outputs["fastxai"].rpi, m.outputs["pgc"], atol=1e-4)

    def ratio(name: str) -> str | None:
        r = m.paired_ratio(name, floor)
        return None if r is None else f"{r:.2f}x"

    return {
        "method": "gradcam tft=True",
        "where": f"resnet50 {LAYER}",
        "batch": x.shape[0],
        "fastxai_ms": m.median_ms("fastxai"),
        "floor_ms": m.median_ms(floor),
        "floor_kind": kind,
        "fx_ratio": ratio("fastxai"),
        "pgc_ratio": ratio("pgc"),
        "tc_ratio": ratio("torchcam"),
        "load": m.load(),
        "cpu": m.cpu_ratio("fastxai"),
        "rpi_agrees": "yes" if agree else "NO",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of 5")
    parser.add_argument("--repeats", type=int, default=None)
    add_results_option(parser)
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    results = Results(__file__, args.results)
    results.table("main", COLUMNS)
    model = torchvision_model("resnet50")
    gen = torch.Generator().manual_seed(0)
    for n in (1, 8):
        row = tft_row(model, torch.randn(n, 3, SIZE, SIZE, generator=gen), repeats)
        results.add("main", row)
        print(" | ".join(str(v) for v in row.values()), file=sys.stderr, flush=True)
    results.finish()
    print(results.markdown("main"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
