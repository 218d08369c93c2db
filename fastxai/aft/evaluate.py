"""The paper's Tables 3 and 4 in miniature: Average Increase / Drop of the original, TFT and AFT
maps, and the test accuracy of the original and AFT-tuned models.

Columns (our reading of the TFT paper's Table 3): "original" mutes each method's map by its
Table 1 default
(:func:`fastxai.thresholding.naive_threshold`), "TFT" uses the :math:`\\tau^*` map of the original
model, "AFT" the AFT model's map with the same default muting and no TFT. The explained class is
each model's top-1 prediction; masked images are binary-masked (the paper's definition).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastxai.aft.models import accuracy
from fastxai.methods import METHODS
from fastxai.metrics import average_increase_drop, mute_lowest
from fastxai.thresholding import naive_threshold

COLUMNS = ("original", "tft", "aft")


@dataclass
class MethodScores:
    """Average Increase and Average Drop per column (``"original"``, ``"tft"``, ``"aft"``)."""

    method: str
    increase: dict[str, float]
    drop: dict[str, float]


def _scores(
    model: nn.Module, x: Tensor, layer: str, method: str, *, tft: bool, batch_size: int
) -> tuple[float, float]:
    increases, drops = [], []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        explanation = METHODS[method](model, chunk, layer, tft=tft)
        maps = explanation.maps if tft else mute_lowest(explanation.maps, naive_threshold(method))
        scores = average_increase_drop(model, chunk, maps, explanation.targets)
        increases.append(scores.increase.float())
        drops.append(scores.drop)
    return float(torch.cat(increases).mean()), float(torch.cat(drops).mean())


def evaluate_methods(
    original: nn.Module,
    tuned: dict[str, nn.Module],
    images: Tensor,
    layer: str,
    *,
    batch_size: int = 256,
    columns: Sequence[str] = COLUMNS,
) -> list[MethodScores]:
    """Table 3: for each method in ``tuned`` (method name -> its AFT model), the ``columns``
    (default all three) on ``images``. Both models must be in eval mode."""
    rows = []
    for method, aft_model in tuned.items():
        inc, drop = {}, {}
        for column in columns:
            if column not in COLUMNS:
                raise ValueError(f"columns: expected some of {COLUMNS}, got {column!r}")
            model = aft_model if column == "aft" else original
            inc[column], drop[column] = _scores(
                model, images, layer, method, tft=column == "tft", batch_size=batch_size
            )
        rows.append(MethodScores(method, inc, drop))
    return rows


def format_table3(rows: Sequence[MethodScores]) -> str:
    """Markdown table: Average Increase (higher is better) and Drop (lower is better)."""
    lines = [
        "| method | AvgInc original | AvgInc TFT | AvgInc AFT | AFT/original "
        "| AvgDrop original | AvgDrop TFT | AvgDrop AFT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = row.increase["original"]
        ratio = row.increase["aft"] / base if base else float("nan")
        lines.append(
            f"| {row.method} | {row.increase['original']:.3f} | {row.increase['tft']:.3f} "
            f"| {row.increase['aft']:.3f} | x{ratio:.2f} | {row.drop['original']:.3f} "
            f"| {row.drop['tft']:.3f} | {row.drop['aft']:.3f} |"
        )
    return "\n".join(lines)


def accuracy_table(
    original: nn.Module, tuned: dict[str, nn.Module], images: Tensor, labels: Tensor
) -> tuple[float, dict[str, float]]:
    """Table 4: test accuracy of the original model and of each method's AFT model."""
    return accuracy(original, images, labels), {
        method: accuracy(model, images, labels) for method, model in tuned.items()
    }


def format_table4(base: float, tuned: dict[str, float]) -> str:
    lines = ["| model | test accuracy | change (points) |", "|---|---|---|"]
    lines.append(f"| original | {100 * base:.2f}% | |")
    for method, value in tuned.items():
        lines.append(f"| AFT ({method}) | {100 * value:.2f}% | {100 * (value - base):+.2f} |")
    return "\n".join(lines)
