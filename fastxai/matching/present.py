"""Activation Matching results for people: a one-line summary and the mask overlay PNG, shared
by the demo and ``fastxai explain --method am``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from fastxai.explanation import Explanation
from fastxai.matching.api import activation_matching

# The demo's ladder starts at 10 %: the deletion sequence does not depend on where it stops, so
# its masks are those of the default ladder, and it stops ~15 % earlier (chelsea: 10 %).
DEMO_AREAS = (0.10, 0.15, 0.20, 0.30)


def am_summary(explanation: Explanation, index: int = 0) -> dict[str, Any]:
    """Image ``index`` of an Activation Matching result: ``recipe``, ``kept`` (fraction of
    pixels), ``target``, ``top1_x``, ``top1_e``, ``top1_kept``, ``p_x`` and ``p_e`` (softmax
    probability of the explained class on the image and on the explanation), ``steps``; for the
    stable recipe also ``area`` (None where no area kept the class), ``found`` and ``ladder``
    (``[(area, keeps_class, p_e), ...]``)."""
    extras = explanation.extras
    summary: dict[str, Any] = {
        "recipe": extras.get("recipe", "paper"),
        "kept": float(extras["kept_fraction"][index]),
        "target": int(explanation.targets[index]),
        "top1_x": int(extras["top1_x"][index]),
        "top1_e": int(extras["top1_e"][index]),
        "top1_kept": bool(extras["top1_kept"][index]),
        "p_x": float(extras["prob_x"][index]),
        "p_e": float(extras["prob_e"][index]),
        "steps": int(extras["loss_history"]["total"].shape[0]),
    }
    if summary["recipe"] == "stable":
        rungs = extras["ladder"]
        summary["found"] = bool(extras["found"][index])
        summary["area"] = float(extras["area"][index]) if summary["found"] else None
        summary["ladder"] = [
            (float(a), bool(k), float(p))
            for a, k, p in zip(
                rungs["areas"], rungs["keeps_class"][index], rungs["prob_e"][index], strict=True
            )
        ]
    return summary


def am_line(summary: dict[str, Any], class_names: Sequence[str] = ()) -> str:
    """One line: ``AM (stable, 27 rounds): 10% area keeps 'tabby' (p 0.612 -> 0.830, ...)`` or
    ``AM (paper, 880 steps): kept 4.7% of pixels, p 0.612 -> 0.830, top-1 kept ('tabby')``."""

    def name(i: int) -> str:
        return repr(class_names[i]) if 0 <= i < len(class_names) else f"class {i}"

    unit = "rounds" if summary["recipe"] == "stable" else "steps"
    head = f"AM ({summary['recipe']}, {summary['steps']} {unit})"
    probabilities = f"p {summary['p_x']:.3f} -> {summary['p_e']:.3f}"
    top1 = (
        f"top-1 kept ({name(summary['top1_x'])})"
        if summary["top1_kept"]
        else f"top-1 changed {name(summary['top1_x'])} -> {name(summary['top1_e'])}"
    )
    if summary["recipe"] != "stable":
        return f"{head}: kept {100 * summary['kept']:.1f}% of pixels, {probabilities}, {top1}"
    if not summary["found"]:
        largest = summary["ladder"][-1][0]
        return (
            f"{head}: no area up to {100 * largest:g}% keeps {name(summary['target'])} "
            f"(largest: {probabilities}, {top1})"
        )
    return (
        f"{head}: {100 * summary['area']:g}% area keeps {name(summary['target'])} "
        f"({probabilities}, {top1})"
    )


def explain_and_draw(
    model: nn.Module,
    x: Tensor,
    display: np.ndarray,
    out_path: str | Path,
    *,
    target: int | None = None,
    progress: bool = True,
    **options: Any,
) -> tuple[Explanation, dict[str, Any], Path]:
    """Run :func:`activation_matching` on one image ``x`` ``(1, 3, H, W)`` and write the overlay
    (the soft mask's colours on the kept pixels, the photo darkened elsewhere) to ``out_path``.

    Returns the explanation, :func:`am_summary` plus ``time_s``, and the written path.
    """
    from fastxai.viz import save_png, tft_overlay

    start = time.perf_counter()
    explanation = activation_matching(model, x, targets=target, progress=progress, **options)
    summary = {**am_summary(explanation), "time_s": time.perf_counter() - start}
    picture = tft_overlay(
        display,
        explanation.extras["soft_mask"][0].detach().float().cpu().numpy(),
        explanation.mask[0].detach().cpu().numpy(),
    )
    return explanation, summary, save_png(picture, out_path)


def demo_photo(
    loaded: Any,
    rgb: np.ndarray,
    photo: str,
    out_dir: str | Path,
    say: Any = print,
    **options: Any,
) -> dict[str, Any]:
    """The demo's Activation Matching panel for one photo (the default, stable recipe, with the
    ladder :data:`DEMO_AREAS` unless ``options`` say otherwise): writes ``<photo>_am.png``, says
    the summary line, and returns :func:`am_summary` plus ``time_s`` and ``path``. ``loaded``
    is a :class:`fastxai.models.LoadedModel`; ``rgb`` the photo; ``options`` go to
    :func:`activation_matching`."""
    from fastxai.models import crop_and_resize

    options = {"areas": DEMO_AREAS, **options}
    areas = ", ".join(f"{100 * a:g}" for a in options["areas"])
    say(
        f"  {'am':<12} Activation Matching on {photo}: the smallest mask of areas {areas} % "
        "that keeps the top-1"
    )
    _, summary, path = explain_and_draw(
        loaded.model,
        loaded.preprocess(rgb),
        crop_and_resize(rgb),
        Path(out_dir) / f"{photo}_am.png",
        **options,
    )
    say(f"  {'':<12} {am_line(summary, loaded.class_names)} ({summary['time_s']:.0f} s) -> {path}")
    return {**summary, "path": str(path)}


__all__ = [
    "DEMO_AREAS",
    "am_line",
    "am_summary",
    "demo_photo",
    "explain_and_draw",
]
