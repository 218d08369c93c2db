"""The end-to-end demo: explain EfficientNet-Lite0 on scikit-image photos and save overlays.

With TFT on (the default), each photo's Grad-CAM map is also threshold fine-tuned
(:func:`fastxai.tft`, the paper's ladder 0.0..0.9): ``<photo>_gradcam_tft.png`` shows what TFT
kept (see :func:`fastxai.viz.tft_overlay`: the Grad-CAM colours on the kept pixels, the photo
darkened on the muted ones) and ``<photo>_rpi.png`` plots RPI versus the threshold with tau*.

With ``am`` (default on), the first photo also gets an Activation Matching mask
(``<photo>_am.png``): the smallest mask of the stable recipe's area ladder that keeps the top-1.

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

from fastxai import ops, thresholding
from fastxai.decomposition.present import DEMO_SKIP_MESSAGE, SRD_METHOD
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
from fastxai.viz import overlay, rpi_plot, save_png, side_by_side, tft_overlay

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
    methods = _check_names("methods", methods, [*METHODS, SRD_METHOD])
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


TFT_METHOD = "gradcam"


def timed_tft(
    model: torch.nn.Module, x: torch.Tensor, explanation: Explanation, repeats: int = 1
) -> tuple[Explanation, float]:
    """:func:`fastxai.tft` on ``explanation``'s maps for its classes, ``repeats`` times; returns
    the tuned explanation and the best wall time in ms. The CAM's logits are reused, so the time
    is TFT's own: the masks and one batched forward of the masked images."""
    best_ms = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        tuned = thresholding.tft(
            model, x, explanation.maps, explanation.targets, logits=explanation.logits
        )
        best_ms = min(best_ms, (time.perf_counter() - start) * 1e3)
    return tuned, best_ms


def tft_summary(tuned: Explanation, index: int = 0) -> dict[str, Any]:
    """Image ``index`` of a TFT result: ``tau`` (tau*), ``rpi`` (the RPI at tau*), ``muted`` (the
    fraction of pixels TFT muted), ``p_before`` (the class's softmax probability on the image)
    and ``p_after`` (on the image masked at tau*; ``None`` when no threshold raised it: TFT then
    keeps the map and mutes only zero-saliency pixels)."""
    if tuned.tau is None or tuned.rpi is None or tuned.mask is None:
        raise ValueError("tft_summary needs a TFT result (tau, rpi and mask are None)")
    best = int(tuned.rpi[index].argmax())
    rpi = float(tuned.rpi[index, best])
    probabilities = tuned.logits[index].float().softmax(dim=0)
    p_after = float(tuned.extras["probabilities"][index, best]) if rpi > 0 else None
    return {
        "tau": float(tuned.tau[index]),
        "rpi": rpi,
        "muted": 1.0 - float(tuned.mask[index].float().mean()),
        "p_before": float(probabilities[int(tuned.targets[index])]),
        "p_after": p_after,
    }


def tft_line(summary: Mapping[str, Any]) -> str:
    """``tau*=0.30 RPI=0.4213 p 0.612 -> 0.870, 57.1% muted``, or, when no threshold raised the
    probability, ``tau*=0.00 RPI=0 p 0.612: no threshold raised it, map kept (2.0% muted: zero
    saliency)``."""
    head = f"tau*={summary['tau']:.2f} RPI={summary['rpi']:.4g}"
    muted = f"{100 * summary['muted']:.1f}% muted"
    if summary["p_after"] is not None:
        return f"{head} p {summary['p_before']:.3f} -> {summary['p_after']:.3f}, {muted}"
    return (
        f"{head} p {summary['p_before']:.3f}: no threshold raised it, map kept "
        f"({muted}: zero saliency)"
    )


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
    tft_layer: str | None = None,
) -> dict[str, Any]:
    """Top-1, one timed explanation per method at ``layers[method]``, and the PNGs (original,
    overlays, grid). With ``tft_layer``, also TFT on the Grad-CAM map at that layer (Grad-CAM's
    own run is reused when it is one of ``methods``): its overlay goes into the grid right after
    the plain Grad-CAM panel, and the RPI plot into ``<photo>_rpi.png``."""
    rgb = load_photo(photo)
    display = crop_and_resize(rgb)
    x = loaded.preprocess(rgb)
    index, probability = top1(loaded.model, x)
    name = class_name(loaded.class_names, index)
    say(f"{photo}: top-1 {name!r} (class {index}), p={probability:.3f}")
    paths = {"original": str(save_png(display, out_dir / f"{photo}.png"))}
    timings_ms: dict[str, float] = {}
    panels, titles = [display], [f"{photo}: {name}"]
    explanations: dict[str, Explanation] = {}
    tft_panel = len(panels)
    for method in methods:
        layer = layers[method]
        if method in PER_CHANNEL_METHODS:
            say(f"  {method:<12} running: one forward per channel of {layer!r}, may take minutes")
        repeats = 1 if method in PER_CHANNEL_METHODS else FAST_METHOD_REPEATS
        explanation, timings_ms[method] = timed_explanation(
            method, loaded.model, x, layer, index, repeats
        )
        explanations[method] = explanation
        blank = " (all-zero map)" if float(explanation.maps.max()) == 0.0 else ""
        picture = overlay(display, explanation.maps[0].detach().cpu().numpy())
        paths[method] = str(save_png(picture, out_dir / f"{photo}_{method}.png"))
        panels.append(picture)
        titles.append(f"{method} ({timings_ms[method]:.0f} ms)")
        if method == TFT_METHOD:
            tft_panel = len(panels)  # the TFT overlay goes right after the plain Grad-CAM one
        timing = f"{timings_ms[method]:>9.1f} ms" + (f" (best of {repeats})" if repeats > 1 else "")
        say(f"  {method:<12} {timing:<24} -> {paths[method]}{blank}")
    summary: dict[str, Any] | None = None
    if tft_layer is not None:
        plain = explanations.get(TFT_METHOD) if layers.get(TFT_METHOD) == tft_layer else None
        if plain is None:  # Grad-CAM was not asked for (at this layer): its panel goes last
            plain, _ = timed_explanation(TFT_METHOD, loaded.model, x, tft_layer, index)
            panels.append(overlay(display, plain.maps[0].detach().cpu().numpy()))
            titles.append(f"{TFT_METHOD} at {tft_layer} (for TFT)")
            tft_panel = len(panels)
        tuned, tft_ms = timed_tft(loaded.model, x, plain, FAST_METHOD_REPEATS)
        summary = {**tft_summary(tuned), "time_ms": tft_ms}
        picture = tft_overlay(
            display, tuned.maps[0].detach().cpu().numpy(), tuned.mask[0].detach().cpu().numpy()
        )
        paths["gradcam_tft"] = str(save_png(picture, out_dir / f"{photo}_gradcam_tft.png"))
        paths["rpi"] = str(
            rpi_plot(
                tuned.extras["thresholds"],
                tuned.rpi[0],
                summary["tau"],
                out_dir / f"{photo}_rpi.png",
                title=f"{photo}: Grad-CAM + TFT for {name!r}",
            )
        )
        panels.insert(tft_panel, picture)
        titles.insert(tft_panel, f"gradcam+TFT tau*={summary['tau']:.2f} ({tft_ms:.0f} ms)")
        timing = f"{tft_ms:>9.1f} ms (best of {FAST_METHOD_REPEATS})"
        say(f"  {'gradcam+TFT':<12} {timing:<24} -> {paths['gradcam_tft']}")
        say(f"  {'':<12} {tft_line(summary)}; RPI plot -> {paths['rpi']}")
    if len(panels) > 1:
        paths["grid"] = str(side_by_side(panels, titles, out_dir / f"{photo}_all.png"))
    return {
        "top1_index": index,
        "top1_name": name,
        "top1_prob": probability,
        "timings_ms": timings_ms,
        "paths": paths,
        "tau": None if summary is None else summary["tau"],
        "tft": summary,
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
    tft: bool = True,
    am: bool = True,
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
        tft: also threshold fine-tune each photo's Grad-CAM map at ``layer`` (Grad-CAM runs for
            this even when it is not in ``methods``) and write ``<photo>_gradcam_tft.png`` (what
            TFT kept, :func:`fastxai.viz.tft_overlay`) and ``<photo>_rpi.png`` (RPI versus the
            threshold, tau* marked).
        am: Activation Matching (stable recipe) on the first photo.

    Returns:
        ``{"out_dir", "kernel", "layers": {method: layer}, "photos": {photo: {"top1_index",
        "top1_name", "top1_prob", "timings_ms": {method: ms}, "paths": {"original" | method |
        "gradcam_tft" | "rpi" | "grid": path}, "tau": tau* or None, "tft": {"tau", "rpi",
        "muted", "p_before", "p_after", "time_ms"} or None (see :func:`tft_summary`)}},
        "paths": [every PNG written], "skipped": [(photo, method), ...], "am": {"kept", "target",
        "top1_x", "top1_e", "top1_kept", "p_x", "p_e", "steps", "time_s", "path"} or None}``.
    """
    methods, photos = check_demo_arguments(methods, photos, per_channel_photos)
    say: Callable[[str], None] = (lambda _line: None) if quiet else print
    # SRD decomposes ResNets and VGGs only: say so rather than show a map of another model.
    methods = [m for m in methods if m != SRD_METHOD]
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
    for traced in dict.fromkeys([*layers.values(), *([layer] if tft else [])]):
        _, warm_up_ms = timed_explanation("gradcam", loaded.model, warm_up_x, traced, 0)
        say(f"warm-up (traces the model once at {traced!r}): {warm_up_ms:.0f} ms")

    results: dict[str, Any] = {}
    skipped: list[tuple[str, str]] = []
    for photo_index, photo in enumerate(photos):
        chosen = [m for m in methods if _runs_on(m, photo_index, per_channel_photos)]
        skipped += [(photo, m) for m in methods if m not in chosen]
        results[photo] = explain_photo(
            loaded, photo, chosen, target_dir, layers, say, tft_layer=layer if tft else None
        )
    am_result = None
    if am:
        from fastxai.matching.present import demo_photo

        am_result = demo_photo(loaded, load_photo(photos[0]), photos[0], target_dir, say)
        results[photos[0]]["paths"]["am"] = am_result["path"]
    written = [p for result in results.values() for p in result["paths"].values()]
    say(f"wrote {len(written)} PNGs to {target_dir}")
    say(DEMO_SKIP_MESSAGE)
    return {
        "out_dir": str(target_dir),
        "kernel": ops.extension_status(),
        "am": am_result,
        "layers": layers,
        "photos": results,
        "paths": written,
        "skipped": skipped,
    }
