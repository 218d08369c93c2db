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
from fastxai.matching.api import DEFAULT_STEPS, activation_matching

# The demo's reduced schedule: the default (880 steps at lr 5e-5) takes minutes per photo on a
# CPU; 200 steps at a 4x larger learning rate cover a similar distance in weight space.
DEMO_STEPS = 200
DEMO_LR = 2e-4
# Three seeds trained together; the panel shows the smallest mask that keeps the top-1 (a single
# 200-step run on chelsea ended at 8-11 % kept with the top-1 lost in two runs).
DEMO_RESTARTS = 3


def am_summary(explanation: Explanation, index: int = 0) -> dict[str, Any]:
    """Image ``index`` of an Activation Matching result: ``kept`` (fraction of pixels),
    ``target``, ``top1_x``, ``top1_e``, ``top1_kept``, ``p_x`` and ``p_e`` (softmax probability
    of the explained class on the image and on the explanation) and ``steps``."""
    extras = explanation.extras
    return {
        "kept": float(extras["kept_fraction"][index]),
        "target": int(explanation.targets[index]),
        "top1_x": int(extras["top1_x"][index]),
        "top1_e": int(extras["top1_e"][index]),
        "top1_kept": bool(extras["top1_kept"][index]),
        "p_x": float(extras["prob_x"][index]),
        "p_e": float(extras["prob_e"][index]),
        "steps": int(extras["loss_history"]["total"].shape[0]),
    }


def am_line(summary: dict[str, Any], class_names: Sequence[str] = ()) -> str:
    """``AM 200/880 steps: kept 4.7% of pixels, p 0.612 -> 0.830, top-1 kept ('tabby')``."""

    def name(i: int) -> str:
        return repr(class_names[i]) if 0 <= i < len(class_names) else f"class {i}"

    top1 = (
        f"top-1 kept ({name(summary['top1_x'])})"
        if summary["top1_kept"]
        else f"top-1 changed {name(summary['top1_x'])} -> {name(summary['top1_e'])}"
    )
    steps = f"{summary['steps']}/{DEFAULT_STEPS} steps"
    return (
        f"AM {steps}: kept {100 * summary['kept']:.1f}% of pixels, "
        f"p {summary['p_x']:.3f} -> {summary['p_e']:.3f}, {top1}"
    )


def explain_and_draw(
    model: nn.Module,
    x: Tensor,
    display: np.ndarray,
    out_path: str | Path,
    *,
    target: int | None = None,
    steps: int = DEMO_STEPS,
    progress: bool = True,
    **options: Any,
) -> tuple[Explanation, dict[str, Any], Path]:
    """Run :func:`activation_matching` on one image ``x`` ``(1, 3, H, W)`` and write the overlay
    (the soft mask's colours on the kept pixels, the photo darkened elsewhere) to ``out_path``.

    Returns the explanation, :func:`am_summary` plus ``time_s``, and the written path.
    """
    from fastxai.viz import save_png, tft_overlay

    start = time.perf_counter()
    explanation = activation_matching(
        model, x, targets=target, steps=steps, progress=progress, **options
    )
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
    *,
    steps: int = DEMO_STEPS,
    lr: float = DEMO_LR,
    restarts: int = DEMO_RESTARTS,
    **options: Any,
) -> dict[str, Any]:
    """The demo's Activation Matching panel for one photo: writes ``<photo>_am.png``, says what
    was reduced and the summary line, and returns :func:`am_summary` plus ``time_s`` and
    ``path``. ``loaded`` is a :class:`fastxai.models.LoadedModel`; ``rgb`` the photo; ``options``
    go to :func:`activation_matching`."""
    from fastxai.models import crop_and_resize

    reduced = f"{steps} steps at lr {lr:g}" + (
        f", reduced from the default {DEFAULT_STEPS} at lr 5e-05 to keep the demo short"
        if (steps, lr) != (DEFAULT_STEPS, 5e-5)
        else ""
    )
    if restarts > 1:
        reduced += f"; {restarts} seeds, showing the smallest mask that keeps the top-1"
    say(f"  {'am':<12} Activation Matching on {photo}: {reduced}")
    _, summary, path = explain_and_draw(
        loaded.model,
        loaded.preprocess(rgb),
        crop_and_resize(rgb),
        Path(out_dir) / f"{photo}_am.png",
        steps=steps,
        lr=lr,
        restarts=restarts,
        keep="smallest",
        **options,
    )
    say(f"  {'':<12} {am_line(summary, loaded.class_names)} ({summary['time_s']:.0f} s) -> {path}")
    return {**summary, "path": str(path)}


__all__ = [
    "DEMO_LR",
    "DEMO_RESTARTS",
    "DEMO_STEPS",
    "am_line",
    "am_summary",
    "demo_photo",
    "explain_and_draw",
]
