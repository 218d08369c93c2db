"""CPU timings of fastxai's CAM methods against their floors and against peer libraries.

Every row times fastxai, the cheapest computation that yields the same inputs to the method (the
*floor*), pytorch-grad-cam 1.5.7 and torchcam 0.5.0, interleaved (the order rotates every
repeat) so that a drifting machine load hits every contender alike. Ratios are medians of the
per-repeat ratios ``contender / floor``; milliseconds are medians of the wall times.

Floors:

* gradient methods and Ablation-CAM: forward + gradient of the top-1 logit to the layer, the
  faster of ``hook`` (forward hook that detaches the layer output with ``requires_grad`` and
  returns a clone, then ``torch.autograd.grad``; parameters left as they are) and ``vjp``
  (``prefix(x)`` of fastxai's split under ``no_grad``, then ``torch.func.vjp`` of the suffix).
* Score-CAM: exactly ``model(masked)`` over all ``N * K`` masked images in chunks of the size
  fastxai uses, under ``torch.inference_mode``; the masked images are built outside the timing.

Run ``python benchmarks/cam_methods.py [--quick] [--repeats R] [--full]``; the rows go to
``benchmarks/results/cam_methods.json`` (``--results``), rendered by ``benchmarks/tables.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _contenders import (
    SIZE,
    THREADS,
    Contender,
    Measured,
    efficientnet_lite0,
    hook_floor,
    max_diff,
    measure,
    pgc_contender,
    pick_floor,
    torchcam_contender,
    torchvision_model,
    vjp_floor,
)
from _results import Results, add_results_option

import fastxai
from fastxai.capture import capture_layer, get_split
from fastxai.methods import score_cam
from fastxai.methods.score_cam import masked_scores

PARITY_TOLERANCE = 1e-4
RAW: list[dict[str, Any]] = []  # every sample of every row, for --raw


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


COLUMNS = [
    ("method", "method"),
    ("where", "model/layer"),
    ("batch", "N"),
    ("fastxai_ms", "fastxai ms", "{:.1f}"),
    ("floor_ms", "floor ms", "{:.1f}"),
    ("floor_kind", "floor"),
    ("fx_ratio", "fastxai/floor"),
    ("pgc_ratio", "pgc/floor"),
    ("tc_ratio", "torchcam/floor"),
    ("load", "load 1m"),
    ("cpu", "CPU/wall fx, floor"),
    ("parity", "max abs diff"),
    ("notes", "notes"),
]


def ratio_text(r: float | None) -> str | None:
    return None if r is None else f"{r:.2f}x"


def parity_text(m: Measured, *, with_torchcam: bool = True) -> tuple[str, bool]:
    """``max|fastxai - pgc|`` (and torchcam's, for information); whether pgc is within 1e-4."""
    fx = m.outputs["fastxai"]
    fx = fx.maps if hasattr(fx, "maps") else fx
    parts, ok = [], True
    if "pgc" in m.outputs:
        d = max_diff(fx, m.outputs["pgc"])
        ok = d <= PARITY_TOLERANCE
        parts.append(f"pgc {d:.1e}{'' if ok else ' FAIL'}")
    if with_torchcam and "torchcam" in m.outputs:
        parts.append(f"tc {max_diff(fx, m.outputs['torchcam']):.1e}")
    return ", ".join(parts) or "-", ok


def make_row(
    method: str,
    where: str,
    batch: int,
    m: Measured,
    floor: str,
    floor_kind: str,
    parity: str,
    notes: str = "",
) -> dict[str, Any]:
    RAW.append(
        {
            "method": method,
            "where": where,
            "batch": batch,
            "floor": floor,
            "samples": {
                name: [None if x is None else [x.wall, x.cpu, x.load] for x in samples]
                for name, samples in m.samples.items()
            },
        }
    )
    fx_t, fx_n = m.trusted_count("fastxai")
    fl_t, fl_n = m.trusted_count(floor)
    trust = f"trusted {fx_t}/{fx_n}, {fl_t}/{fl_n}"
    notes = f"{notes}; {trust}" if notes else trust
    return {
        "method": method,
        "where": where,
        "batch": batch,
        "fastxai_ms": m.median_ms("fastxai"),
        "floor_ms": m.median_ms(floor),
        "floor_kind": floor_kind,
        "fx_ratio": ratio_text(m.paired_ratio("fastxai", floor)),
        "pgc_ratio": ratio_text(m.paired_ratio("pgc", floor)),
        "tc_ratio": ratio_text(m.paired_ratio("torchcam", floor)),
        "load": round(m.load(), 2),
        "cpu": f"{m.cpu_ratio('fastxai'):.2f}, {m.cpu_ratio(floor):.2f}",
        "parity": parity,
        "notes": notes,
    }


GRADIENT_METHODS = {
    # fastxai name: (pytorch-grad-cam class, torchcam class)
    "gradcam": ("GradCAM", "GradCAM"),
    "gradcampp": ("GradCAMPlusPlus", "GradCAMpp"),
    "layercam": ("LayerCAM", "LayerCAM"),
}


def gradient_rows(model: nn.Module, x: Tensor, repeats: int, log: Callable) -> list[dict[str, Any]]:
    rows = []
    for method, (pgc_cls, tc_cls) in GRADIENT_METHODS.items():
        explain = fastxai.METHODS[method]
        contenders = [
            Contender("fastxai", lambda explain=explain: explain(model, x, "layer4")),
            hook_floor(model, "layer4", x),
            vjp_floor(model, "layer4", x),
            pgc_contender(pgc_cls, model, "layer4", x),
            torchcam_contender(tc_cls, model, "layer4", x),
        ]
        m = measure(contenders, repeats)
        floor, kind = pick_floor(m)
        parity, _ = parity_text(m)
        rows.append(make_row(method, "resnet50 layer4", x.shape[0], m, floor, kind, parity))
        log(rows[-1])
    return rows


def ablation_row(
    model: nn.Module, x: Tensor, repeats: int, full: bool, log: Callable
) -> dict[str, Any]:
    contenders = [
        Contender("fastxai", lambda: fastxai.ablationcam(model, x, "layer4")),
        hook_floor(model, "layer4", x),
        vjp_floor(model, "layer4", x),
    ]
    batch = x.shape[0]
    notes = ""
    if batch == 1 or full:
        pgc = pgc_contender("AblationCAM", model, "layer4", x)
        pgc.repeats, pgc.warmup = 1, False
        contenders.append(pgc)
        notes = "pgc: 1 run"
    else:
        notes = "pgc skipped (--full)"
    m = measure(contenders, repeats)
    floor, kind = pick_floor(m)
    parity, _ = parity_text(m, with_torchcam=False)
    row = make_row("ablationcam", "resnet18 layer4", batch, m, floor, kind, parity, notes)
    log(row)
    return row


def scorecam_chunk(x: Tensor) -> int:
    """The number of masked images per forward that fastxai's Score-CAM uses by default."""
    try:
        from fastxai._batching import rows_per_batch
    except ImportError:  # before fastxai._batching existed: 256 MiB / 4 per forward batch
        image_bytes = x[0].numel() * x.element_size()
        return max(1, 256 * 2**20 // (4 * max(image_bytes, 1)))
    return rows_per_batch(x, None)


def masked_images(model: nn.Module, layer: str, x: Tensor, chunk: int) -> list[Tensor]:
    """All ``N * K`` masked images ``x_n * M_k`` (fastxai's / pgc's masks), in chunks."""
    split = get_split(model, layer)
    with torch.inference_mode():
        a = split.prefix(x)[0]
        n, c = a.shape[:2]
        up = F.interpolate(
            a.reshape(n * c, 1, *a.shape[2:]),
            size=x.shape[2:],
            mode="bilinear",
            align_corners=True,
        )[:, 0]
        low = up.flatten(1).amin(1)[:, None, None]
        high = up.flatten(1).amax(1)[:, None, None]
        masks = (up - low) / (high - low + score_cam.SCORECAM_EPS)
        image = torch.arange(n).repeat_interleave(c)
        chunks = [
            (x[image[s : s + chunk]] * masks[s : s + chunk, None]).contiguous()
            for s in range(0, n * c, chunk)
        ]
    return chunks


def scorecam_row(
    model: nn.Module,
    where: str,
    layer: str,
    x: Tensor,
    repeats: int,
    log: Callable,
    peers: bool,
) -> dict[str, Any]:
    chunk = scorecam_chunk(x)
    n = x.shape[0]
    # Untimed: fastxai's own masked scores give the all-zero channel count and warm it up.
    cap = capture_layer(model, x, layer, None, with_gradient=False)
    fx_scores, constant = masked_scores(cap, model, x)
    channels = cap.activation.shape[1]
    chunks = masked_images(model, layer, x, chunk)
    target = cap.targets.classes

    def floor_run() -> list[Tensor]:
        with torch.inference_mode():
            return [model(masked) for masked in chunks]

    contenders = [
        Contender("fastxai", lambda: fastxai.scorecam(model, x, layer), warmup=False),
        Contender("floor", floor_run, warmup=False),
    ]
    if peers:
        contenders.append(pgc_contender("ScoreCAM", model, layer, x, batch_size=chunk))
        contenders[-1].warmup = False
        contenders.append(torchcam_contender("ScoreCAM", model, layer, x, batch_size=chunk))
        contenders[-1].warmup = False
    m = measure(contenders, repeats)
    # Equal output: the floor's masked scores give Score-CAM's weights independently of fastxai.
    logits = torch.cat(m.outputs.pop("floor"))
    index = target.view(n, 1, 1).expand(n, channels, 1)
    weights = torch.softmax(logits.view(n, channels, -1).gather(2, index)[..., 0], 1)
    fx_weights = m.outputs["fastxai"].extras["weights"]
    parity, _ = parity_text(m) if peers else ("-", True)
    parity += f"; weights vs floor {max_diff(fx_weights, weights):.1e}"
    chunks.clear()
    zero = int(constant.sum())
    notes = f"{zero}/{n * channels} all-zero masks; chunk {chunk}"
    row = make_row("scorecam", where, n, m, "floor", f"{n * channels} masked fwd", parity, notes)
    log(row)
    del fx_scores
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of 5")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender")
    parser.add_argument(
        "--full",
        action="store_true",
        help="also pytorch-grad-cam's Ablation-CAM at batch 8 and Score-CAM at batch 8",
    )
    add_results_option(parser)
    parser.add_argument(
        "--raw",
        type=str,
        default=None,
        help="write every sample (wall s, CPU s, load) of every row to this JSON file",
    )
    parser.add_argument(
        "--only",
        type=str,
        default="gradient,ablation,scorecam,efficientnet",
        help="comma-separated subset of: gradient, ablation, scorecam, efficientnet",
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    only = set(args.only.split(","))

    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")

    results = Results(__file__, args.results)
    results.table("main", COLUMNS)

    def log(row: dict[str, Any]) -> None:
        """Keep the row (written at once: a stopped run keeps its rows) and show it."""
        results.add("main", row)
        print(" | ".join(str(v) for v in row.values()), file=sys.stderr, flush=True)
        if args.raw:
            with open(args.raw, "w") as f:
                json.dump(RAW, f, indent=1)

    print(
        f"# fastxai {fastxai.__version__}, torch {torch.__version__}, {THREADS} threads, "
        f"{platform.machine()} ({os.cpu_count()} cores), extension {fastxai.has_extension()}, "
        f"repeats {repeats}, load at start {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
        flush=True,
    )
    gen = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(n, 3, SIZE, SIZE, generator=gen) for n in (1, 8)}
    if "gradient" in only:
        model = torchvision_model("resnet50")
        for n in (1, 8):
            gradient_rows(model, inputs[n], repeats, log)
        del model
    if "ablation" in only or "scorecam" in only:
        model = torchvision_model("resnet18")
        if "ablation" in only:
            for n in (1, 8):
                ablation_row(model, inputs[n], repeats, args.full, log)
        if "scorecam" in only:
            for n in (1, 8) if args.full else (1,):
                scorecam_row(model, "resnet18 layer4", "layer4", inputs[n], repeats, log, True)
        del model
    if "efficientnet" in only:
        model, x = efficientnet_lite0()
        where = "efficientnet-lite0 _swish@1 (coffee)"
        scorecam_row(model, where, "_swish@1", x, repeats, log, False)
    results.finish()
    print(results.markdown("main"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
