"""Layer-CAM over resnet50's four stages (``layer1..layer4``): one pass against the floor and peers.

Contenders, interleaved (the order rotates every round) at batch 1 and 8, 224 x 224 inputs:

* ``fastxai``: ``fastxai.layercam(model, x, ["layer1", "layer2", "layer3", "layer4"])`` (one
  forward and one backward for the four layers, through the model's layer chain);
* ``fastxai per layer``: the same maps with every layer captured through its own split (one
  forward and one vector-Jacobian product per layer, what fastxai did before the chain);
* the floor: one forward plus the gradient of the top-1 logit to ``layer1`` (the shallowest
  layer), the faster of the ``hook`` and ``vjp`` floors of ``cam_methods.py``;
* pytorch-grad-cam 1.5.7: ``LayerCAM(model, [layer1, layer2, layer3, layer4])(x, None)``;
* torchcam 0.5.0: ``LayerCAM(model, ["layer1", ..., "layer4"])``, its ``fuse_cams`` of the four
  maps, bilinear upsampling to 224 and a per-image min-max (torchcam fuses by its own rule, so
  its maps are not compared).

Ratios are medians over rounds of ``contender / floor`` in the same round; milliseconds are
medians (over the trusted rounds when there are any: both threads ran). Run
``python benchmarks/cam_several_layers.py [--rounds R] [--batches 1,8] [--flops]``; the rows go
to ``benchmarks/results/cam_several_layers.json`` (``--flops``: ``cam_several_layers-flops.json``;
``--results`` for another file), rendered by ``benchmarks/tables.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _contenders import (
    THREADS,
    Contender,
    Measured,
    hook_floor,
    pick_floor,
    quiet,
    time_contender,
    torchvision_model,
    upsample_minmax,
    vjp_floor,
)
from _results import RESULTS_DIR, Results, add_results_option

import fastxai
from fastxai.methods._base import explain_layers
from fastxai.methods.layer_cam import layercam_contributions, layercam_raw_map

LAYERS = ["layer1", "layer2", "layer3", "layer4"]
SIZE = 224


def fastxai_per_layer(model: nn.Module, x: Tensor) -> Contender:
    def run() -> Tensor:
        return explain_layers(
            model,
            x,
            LAYERS,
            None,
            layercam_contributions,
            method="layercam",
            with_gradient=True,
            raw_map=layercam_raw_map,
            reruns_suffix=True,  # every layer through its own split
        ).maps

    return Contender("fastxai per layer", run)


def pgc_layercam(model: nn.Module, x: Tensor) -> Contender:
    import pytorch_grad_cam as pgc

    holder: list[Any] = []

    def setup() -> None:
        layers = [model.get_submodule(name) for name in LAYERS]
        holder.append(pgc.LayerCAM(model=model, target_layers=layers))

    def run() -> np.ndarray:
        with quiet():
            return holder[-1](x, None)

    def teardown() -> None:
        holder.pop().activations_and_grads.release()
        model.zero_grad(set_to_none=True)

    return Contender("pgc", run, setup, teardown)


def torchcam_layercam(model: nn.Module, x: Tensor) -> Contender:
    from torchcam.methods import LayerCAM

    holder: list[Any] = []

    def setup() -> None:
        holder.append(LayerCAM(model, LAYERS))

    def run() -> Tensor:
        ext = holder[-1]
        scores = model(x)
        cams = ext(scores.argmax(1).tolist(), scores)
        with torch.no_grad():
            return upsample_minmax(ext.fuse_cams(cams))

    def teardown() -> None:
        ext = holder.pop()
        ext.remove_hooks()
        ext.reset_hooks()

    return Contender("torchcam", run, setup, teardown)


def measure_rounds(contenders: list[Contender], rounds: int) -> Measured:
    """One untimed run of each contender (its output kept for the parity check), then exactly
    ``rounds`` rounds in rotating order; set-up and tear-down (hooks) stay outside the timing."""
    result = Measured({c.name: [] for c in contenders})
    for r in range(-1, rounds):
        shift = max(r, 0) % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            sample, out = time_contender(c)
            if r < 0:
                result.outputs[c.name] = out
            else:
                result.samples[c.name].append(sample)
            del out
    return result


COLUMNS = [
    ("batch", "N"),
    ("rounds", "rounds"),
    ("fastxai_ms", "fastxai ms", "{:.1f}"),
    ("floor_ms", "floor ms", "{:.1f}"),
    ("floor_kind", "floor"),
    ("fx_ratio", "fastxai/floor", "{:.2f}x"),
    ("per_layer_ratio", "per layer/floor", "{:.2f}x"),
    ("pgc_ratio", "pgc/floor", "{:.2f}x"),
    ("tc_ratio", "torchcam/floor", "{:.2f}x"),
    ("trusted", "trusted rounds"),
    ("load", "load 1m", "{:.2f}"),
    ("pgc_diff", "max abs diff vs pgc", "{:.1e}"),
    ("chain_diff", "max abs diff per layer vs chain", "{:.1e}"),
]
FLOP_COLUMNS = [
    ("batch", "N"),
    ("fastxai", "fastxai GFLOP", "{:.2f}"),
    ("per_layer", "per layer GFLOP", "{:.2f}"),
    ("floor", "floor (vjp) GFLOP", "{:.2f}"),
]


def flop_row(model: nn.Module, x: Tensor) -> dict[str, Any]:
    """Convolution and matmul GFLOP of fastxai, fastxai per layer and the vjp floor."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for c in (
        Contender("fastxai", lambda: fastxai.layercam(model, x, LAYERS).maps),
        fastxai_per_layer(model, x),
        vjp_floor(model, LAYERS[0], x),
    ):
        with FlopCounterMode(display=False) as counter:
            c.run()
        counts.append(counter.get_total_flops() / 1e9)
    return {"batch": x.shape[0], "fastxai": counts[0], "per_layer": counts[1], "floor": counts[2]}


def timing_row(model: nn.Module, x: Tensor, rounds: int) -> dict[str, Any]:
    contenders = [
        Contender("fastxai", lambda: fastxai.layercam(model, x, LAYERS).maps),
        fastxai_per_layer(model, x),
        hook_floor(model, LAYERS[0], x),
        vjp_floor(model, LAYERS[0], x),
        pgc_layercam(model, x),
        torchcam_layercam(model, x),
    ]
    m = measure_rounds(contenders, rounds)
    floor, kind = pick_floor(m)
    trusted, total = m.trusted_count("fastxai")
    return {
        "batch": x.shape[0],
        "rounds": rounds,
        "fastxai_ms": m.median_ms("fastxai"),
        "floor_ms": m.median_ms(floor),
        "floor_kind": kind,
        "fx_ratio": m.paired_ratio("fastxai", floor),
        "per_layer_ratio": m.paired_ratio("fastxai per layer", floor),
        "pgc_ratio": m.paired_ratio("pgc", floor),
        "tc_ratio": m.paired_ratio("torchcam", floor),
        "trusted": f"{trusted}/{total}",
        "load": m.load(),
        "pgc_diff": float(np.abs(m.outputs["fastxai"].numpy() - m.outputs["pgc"]).max()),
        "chain_diff": float((m.outputs["fastxai"] - m.outputs["fastxai per layer"]).abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per batch size")
    parser.add_argument("--batches", type=str, default="1,8")
    parser.add_argument(
        "--flops",
        action="store_true",
        help="instead of timing, count the convolution and matmul FLOPs of fastxai, fastxai "
        "per layer and the vjp floor (torch.utils.flop_counter; independent of machine load)",
    )
    add_results_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    if args.flops and args.results is True:
        args.results = RESULTS_DIR / "cam_several_layers-flops.json"
    results = Results(__file__, args.results)
    name = "flops" if args.flops else "main"
    results.table(name, FLOP_COLUMNS if args.flops else COLUMNS)
    model = torchvision_model("resnet50")
    gen = torch.Generator().manual_seed(0)
    for n in (int(b) for b in args.batches.split(",")):
        x = torch.randn(n, 3, SIZE, SIZE, generator=gen)
        row = flop_row(model, x) if args.flops else timing_row(model, x, args.rounds)
        results.add(name, row)
        print(" | ".join(str(v) for v in row.values()), file=sys.stderr, flush=True)
    results.finish()
    print(results.markdown(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
