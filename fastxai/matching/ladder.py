"""The stable Activation Matching recipe: greedy deletion of image cells under the Activation
Matching loss, coarse to fine, and a ladder of areas read off the deletion order.

Why not gradient descent on the mask: a ReLU network's input gradient is piecewise constant, and
moving the input by 1e-6 changes EfficientNet-Lite0's gradient with respect to a 7 x 7 mask by
0.16 % (the same in float64, so it is not rounding). Gradient descent on a mask amplifies such
differences: masks of chelsea optimised from the same start on the photo and on the photo plus
1e-6 noise (Adam, normalised SGD or SGD; 7 x 7, 14 x 14 or 28 x 28 logits; with or without an
area and temperature continuation) overlapped with IoU 0.12-0.56, all of them keeping the class.
Many small masks keep a prediction, and which one a gradient method finds is decided by noise:
the seed, the thread count, a rounding difference.

Decisions made by comparing *loss values* are stable instead: values move by ~1e-6 when the input
does, so two runs only part ways where two candidates tie to within that. The recipe:

1. Split the image into cells of ``coarse`` pixels (32 at 224: 7 x 7 cells). All are kept.
2. Each round, score every kept cell by the loss of the image with that cell removed
   (:math:`L = \\lambda_{act} L_{act} + \\lambda_{KL} L_{KL} + \\lambda_{CE} L_{CE}` on
   :math:`e = m \\odot x`: the paper's fidelity terms, one batched forward per chunk of
   candidates), and remove the ``delete_fraction`` of kept cells (at least one) whose removal
   costs least.
3. Below ``refine_below`` of the pixels, split every kept cell into ``fine``-pixel cells (16 at
   224) and go on at that resolution until the area is below the smallest rung.
4. The ladder: for each area ``a``, the first mask of the deletion sequence that keeps at most
   ``a`` of the pixels. The result is the smallest rung whose mask keeps the explained class as
   the top-1 with :math:`p(e) \\ge` ``keep_ratio`` :math:`\\cdot p(x)`; when none does, it says so.

Masks are unions of cells (no speckle, no threshold at 0.5 to hover around) and depend only on the
model and the image: there is no seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastxai.matching.features import run_extractor
from fastxai.matching.losses import activation_loss, ce_loss, kl_loss

DEFAULT_AREAS = (0.05, 0.10, 0.15, 0.20, 0.30)
DEFAULT_KEEP_RATIO = 0.5
# The fine cell's side in pixels at 224 (scaled with the image's shorter side); a coarse cell
# is a 2 x 2 block of fine cells.
FINE_CELL_224 = 16
DEFAULT_REFINE_BELOW = 0.3
DEFAULT_DELETE_FRACTION = 0.1
DEFAULT_BATCH_SIZE = 32
SCORED_TERMS = ("act", "kl", "ce")


@dataclass(frozen=True)
class ScoreConfig:
    """How candidates are scored: the matched layers' weights and distances, the KL temperature
    and the weights of the act, kl and ce terms."""

    layer_weights: tuple[float, ...]
    distances: tuple[str, ...]
    temperature: float
    act: float
    kl: float
    ce: float


def fine_cell(size: Sequence[int]) -> int:
    """The fine cell's side in pixels for an image of ``size``: 16 at 224, at least 1."""
    return max(1, round(FINE_CELL_224 * min(size) / 224))


def grid_shape(size: Sequence[int], cell: int) -> tuple[int, int]:
    """Cells per column and row: ``ceil(H / cell) x ceil(W / cell)``."""
    return math.ceil(size[0] / cell), math.ceil(size[1] / cell)


def cells_to_pixels(keep: Tensor, cell: int, size: Sequence[int]) -> Tensor:
    """``(B, H, W)`` pixel mask of cell masks ``keep`` ``(B, gh, gw)`` (cells of ``cell`` px)."""
    pixels = keep.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    return pixels[:, : size[0], : size[1]]


def coarse_groups(grid: Sequence[int], device: torch.device) -> Tensor:
    """``(gh * gw,)``: the index of the 2 x 2 block of fine cells each fine cell belongs to."""
    rows = torch.arange(grid[0], device=device) // 2
    cols = torch.arange(grid[1], device=device) // 2
    return (rows[:, None] * math.ceil(grid[1] / 2) + cols[None, :]).flatten()


def compose(mask: Tensor, x: Tensor, background: Tensor | None) -> Tensor:
    r""":math:`m \odot x + (1 - m) \odot b` for masks ``(B, H, W)``; ``b = 0`` (the paper's
    explanation, the mean colour in normalised space) when ``background`` is None."""
    m = mask[:, None].to(x.dtype)
    return m * x if background is None else m * x + (1 - m) * background


@torch.no_grad()
def score_masks(
    extractor: nn.Module,
    x: Tensor,
    masks: Tensor,
    owner: Tensor,
    target_logits: Tensor,
    target_features: list[Tensor],
    labels: Tensor,
    config: ScoreConfig,
    batch_size: int,
    background: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(loss (B,), terms (B, 3))``: the weighted loss and the [act, kl, ce] terms of
    ``e = compose(masks[b], x[owner[b]], background[owner[b]])`` for pixel masks ``masks``
    ``(B, H, W)``."""
    losses, terms = [], []
    weights = torch.tensor([config.act, config.kl, config.ce], dtype=x.dtype, device=x.device)
    for start in range(0, masks.shape[0], batch_size):
        rows = owner[start : start + batch_size]
        b = None if background is None else background[rows]
        e = compose(masks[start : start + batch_size], x[rows], b)
        logits, features = run_extractor(extractor, e)
        act = activation_loss(
            [f[rows] for f in target_features],
            features,
            list(config.layer_weights),
            list(config.distances),
        )
        kl = kl_loss(target_logits[rows], logits, config.temperature)
        ce = ce_loss(logits, labels[rows])
        chunk = torch.stack([act, kl, ce], 1)
        terms.append(chunk)
        losses.append(chunk @ weights)
    return torch.cat(losses), torch.cat(terms)


@dataclass
class DeletionResult:
    """The deletion sequence of every image: ``masks[s]`` ``(N, H, W)`` after step ``s`` (step 0:
    everything kept), ``kept[s]`` ``(N,)`` their kept fractions and ``terms[s]`` ``(N, 3)`` the
    [act, kl, ce] terms of the mask chosen at step ``s`` (NaN at step 0)."""

    masks: list[Tensor]
    kept: Tensor
    terms: Tensor


def deletion_candidates(kept: Tensor, groups: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(trials (C, G), removed (C, G))``: one trial per kept group of cells (``groups``: the
    group of each cell, or ``None`` for one cell each), ``kept`` ``(G,)`` with that group off."""
    cells = kept.nonzero()[:, 0]
    if groups is None:
        removed = torch.zeros((cells.numel(), kept.numel()), dtype=torch.bool, device=kept.device)
        removed[torch.arange(cells.numel(), device=kept.device), cells] = True
    else:
        removed = groups[None, :] == groups[cells].unique()[:, None]
    return kept[None, :] & ~removed, removed


def check_finite(loss: Tensor, terms: Tensor, owners: Tensor, deletion_round: int) -> None:
    """A :class:`FloatingPointError` naming the term and the image of the first non-finite
    candidate loss."""
    bad = ~torch.isfinite(loss)
    if not bool(bad.any()):
        return
    first = int(bad.nonzero()[0, 0])
    values = terms[first].tolist()
    broken = [n for n, v in zip(SCORED_TERMS, values, strict=True) if not math.isfinite(v)]
    what = f"the {broken[0]!r} loss term" if broken else "the weighted loss (check the weights)"
    raise FloatingPointError(
        f"activation_matching: {what} is not finite in deletion round {deletion_round} "
        f"(image {int(owners[first])})"
    )


def greedy_deletion(
    extractor: nn.Module,
    x: Tensor,
    target_logits: Tensor,
    target_features: list[Tensor],
    labels: Tensor,
    config: ScoreConfig,
    *,
    smallest_area: float,
    refine_below: float = DEFAULT_REFINE_BELOW,
    delete_fraction: float = DEFAULT_DELETE_FRACTION,
    batch_size: int = DEFAULT_BATCH_SIZE,
    background: Tensor | None = None,
    progress: bool = False,
) -> DeletionResult:
    """Delete cells of every image until each keeps at most ``smallest_area`` of its pixels (or
    a single cell); see the module docstring. The cells of all images are scored in shared
    batches."""
    from tqdm.auto import tqdm

    n, size = x.shape[0], x.shape[-2:]
    fine = fine_cell(size)
    grid = grid_shape(size, fine)
    groups = coarse_groups(grid, x.device)
    keep = torch.ones((n, grid[0] * grid[1]), dtype=torch.bool, device=x.device)

    def pixel_masks(cells: Tensor) -> Tensor:
        return cells_to_pixels(cells.view(-1, *grid), fine, size)

    masks = [pixel_masks(keep)]
    kept = [masks[0].flatten(1).float().mean(1)]
    terms = [x.new_full((n, 3), float("nan"))]
    bar = tqdm(desc="activation matching", disable=not progress, leave=False, unit="round")
    while True:
        active = [i for i in range(n) if kept[-1][i] > smallest_area and int(keep[i].sum()) > 1]
        if not active:
            break
        blocks = []
        for i in active:
            coarse = bool(kept[-1][i] > refine_below)
            trials, removed = deletion_candidates(keep[i], groups if coarse else None)
            blocks.append((i, trials, removed))
        trials = torch.cat([b[1] for b in blocks])
        owners = torch.cat([torch.full((b[1].shape[0],), b[0], device=x.device) for b in blocks])
        loss, trial_terms = score_masks(
            extractor,
            x,
            pixel_masks(trials),
            owners,
            target_logits,
            target_features,
            labels,
            config,
            batch_size,
            background,
        )
        check_finite(loss, trial_terms, owners, len(masks))
        step_terms = x.new_full((n, 3), float("nan"))
        keep = keep.clone()
        offset = 0
        for i, block, removed in blocks:
            count = block.shape[0]
            remove = max(1, int(delete_fraction * count))
            order = torch.sort(loss[offset : offset + count], stable=True).indices[:remove]
            keep[i] &= ~removed[order].any(0)
            step_terms[i] = trial_terms[offset + int(order[0])]
            offset += count
        masks.append(pixel_masks(keep))
        kept.append(masks[-1].flatten(1).float().mean(1))
        terms.append(step_terms)
        bar.update()
        if progress:
            bar.set_postfix(kept=f"{float(kept[-1].max()):.3f}")
    bar.close()
    return DeletionResult(masks, torch.stack(kept), torch.stack(terms))


def ladder_rungs(result: DeletionResult, areas: Tensor) -> Tensor:
    """``(N, A)`` long: per image and area, the first step of the deletion sequence whose mask
    keeps at most that area (the last step when none does)."""
    within = result.kept[:, :, None] <= areas.to(result.kept.device)[None, None].float()  # (S,N,A)
    last = result.kept.shape[0] - 1
    first = within.int().argmax(0)
    return torch.where(within.any(0), first, torch.full_like(first, last))
