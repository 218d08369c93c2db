"""TFT masks for a whole training set, written through the atomic sharded writer.

For every image :math:`x_i` the chosen CAM method gives a map, TFT picks :math:`\\tau^*` and the
mask :math:`M_{\\tau^*}(x_i)` (input resolution), and the AFT target is that mask pooled to the
explained layer's resolution ``(h, w)`` (the paper's §4.2 leaves the reduction open): ``avg`` gives
the kept fraction of each cell, ``nearest`` the mask at the cells' sampled pixels. Each rank of a
distributed job handles the indices ``rank, rank + world_size, ...``; a rerun skips every index a
complete shard already holds, so a killed job continues where it stopped (at most one unwritten
shard per rank is redone).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from fastxai import distributed
from fastxai.identity import tensor_digest, weights_digest
from fastxai.io import ShardWriter, read_meta, read_shards, remove_results
from fastxai.methods import METHODS

Pool = Literal["avg", "nearest"]
TargetChoice = Literal["pred", "label"]


def pool_mask(mask: Tensor, size: tuple[int, int], pool: Pool = "avg") -> Tensor:
    """Binary masks ``(N, H, W)`` -> float targets ``(N, h, w)`` in [0, 1] (see module doc)."""
    as_float = mask.float()[:, None]
    if pool == "avg":
        return F.adaptive_avg_pool2d(as_float, size)[:, 0]
    if pool == "nearest":
        return F.interpolate(as_float, size=size, mode="nearest")[:, 0]
    raise ValueError(f"pool must be 'avg' or 'nearest', got {pool!r}")


@dataclass
class MaskJob:
    """What :func:`generate_masks` did on this rank: items computed now, and items skipped
    because earlier runs had written them."""

    computed: int
    skipped: int


def generate_masks(
    model: nn.Module,
    images: Tensor,
    root: str | os.PathLike[str],
    *,
    layer: str,
    method: str = "gradcam",
    labels: Tensor | None = None,
    target: TargetChoice = "pred",
    batch_size: int = 256,
    shard_size: int = 4096,
    pool: Pool = "avg",
    keep_masks: bool = False,
    tft_options: dict[str, Any] | None = None,
    context: distributed.Context | None = None,
    progress: bool = True,
    restart: bool = False,
) -> MaskJob:
    """Write the AFT targets of ``images`` under ``root`` (resumable; see the module doc).

    Args:
        model: the original classifier in eval mode (never modified).
        images: ``(N, C, H, W)`` normalised images (on any device; batches move to the model's).
        root: output folder of shards ``rank{r}-{k}.pt`` with fields ``target`` ``(n, h, w)``,
            ``tau`` ``(n,)``, ``cls`` ``(n,)`` (the explained class) and, with ``keep_masks``,
            ``mask`` ``(n, H, W)`` bool.
        layer: the explained layer (the layer AFT will tune).
        method: a name in :data:`fastxai.METHODS` (one AFT model per network and method).
        labels: ``(N,)`` training labels; needed for ``target="label"``.
        target: explain the predicted class (``"pred"``, as the metrics do) or the label.
        batch_size: images per CAM + TFT call; shard_size: items per shard file.
        pool: how the input-resolution mask becomes the layer-resolution target.
        tft_options: keyword arguments for :func:`fastxai.tft` (ladder, mode, mask kind).
        context: the distributed context (default: the initialised process group, if any).
        restart: delete ``root``'s earlier masks first; without it, a resume whose images,
            labels, model weights or options differ from the folder's ``meta.json`` is refused.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if target not in ("pred", "label"):
        raise ValueError(f"target must be 'pred' or 'label', got {target!r}")
    if target == "label" and labels is None:
        raise ValueError("target='label' needs labels")
    if pool not in ("avg", "nearest"):
        raise ValueError(f"pool must be 'avg' or 'nearest', got {pool!r}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    ctx = context or distributed.current()
    device = next(model.parameters()).device
    meta = {
        "method": method,
        "layer": layer,
        "target": target,
        "pool": pool,
        "num_items": len(images),
        "image_size": list(images.shape[1:]),
        "tft_options": {k: _jsonable(v) for k, v in (tft_options or {}).items()},
        "images": tensor_digest(images),
        "labels": None if labels is None else tensor_digest(torch.as_tensor(labels)),
        "model_weights": weights_digest(model),
    }
    mine = torch.arange(len(images))[ctx.rank :: ctx.world_size]
    if restart:
        if ctx.is_main:
            remove_results(root)
        ctx.barrier()
    with ShardWriter(root, shard_size=shard_size, rank=ctx.rank, meta=meta) as writer:
        todo = writer.pending(mine)
        batches = todo.split(batch_size) if len(todo) else ()  # split() of nothing gives one
        for batch in tqdm(
            batches,
            desc=f"TFT masks ({method})",
            unit="batch",
            disable=not (progress and ctx.is_main),
        ):
            x = images[batch].to(device)
            classes = None if target == "pred" else labels[batch].to(device)
            explanation = METHODS[method](
                model, x, layer, classes, tft=True, tft_options=tft_options
            )
            fields = {
                "target": pool_mask(explanation.mask, tuple(explanation.raw.shape[-2:]), pool),
                "tau": explanation.tau.float(),
                "cls": explanation.targets,
            }
            if keep_masks:
                fields["mask"] = explanation.mask
            writer.write(batch, **fields)
    ctx.barrier()
    return MaskJob(computed=len(todo), skipped=len(mine) - len(todo))


def _jsonable(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def load_targets(root: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The fields of a finished mask job, one row per image in index order.

    Raises ``ValueError`` if some image has no complete shard yet (the job did not finish).
    """
    fields = read_shards(root)
    expected = read_meta(root).get("num_items")
    count = int(fields["index"].numel())
    complete = expected is None or (
        count == expected and bool((fields["index"] == torch.arange(count)).all())
    )
    if not complete:
        raise ValueError(
            f"{root}: masks for {count} of {expected} images; rerun the mask job to finish it"
        )
    return fields
