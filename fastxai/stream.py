"""Explaining many images: batched streams with a progress bar, and sharded dataset jobs.

* :func:`explain_stream` explains an iterable of images (single images, batches, or a
  ``DataLoader`` yielding ``(images, labels)``) in batches of ``batch_size``, optionally with TFT,
  and yields one :class:`~fastxai.Explanation` per batch.
* :func:`explain_dataset` explains a map-style dataset and writes the results through
  :class:`fastxai.io.ShardWriter`: atomic, resumable after a kill, and, under ``torchrun``, split
  over the ranks with a ``DistributedSampler`` (each rank writes its own shards).
* :class:`ImageFiles`: a folder of images as a dataset (the ``fastxai explain-dataset`` command,
  :mod:`fastxai.cli.dataset`, explains one).

Mixed precision: ``autocast=torch.bfloat16`` (CPU) or ``torch.float16`` / ``torch.bfloat16``
(CUDA) runs the model passes under :func:`torch.autocast`; the maps are computed in float32. The
model's memory format is the caller's choice (``model.to(memory_format=torch.channels_last)``);
``memory_format=`` converts the batches to match.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastxai._checks import check_model, model_device
from fastxai.explanation import Explanation
from fastxai.methods import METHODS
from fastxai.methods._base import Layer, normalise_layers

TargetsFrom = Literal["top1", "labels"]
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _as_long(values: Any, n: int, name: str) -> Tensor:
    t = torch.as_tensor(values).reshape(-1)
    if t.numel() != n or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected {n} integers for a batch of {n} images, got {t}")
    return t.long()


def _split_item(item: Any, position: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """One stream item -> ``(images (n, C, H, W), labels (n,) or None, indices (n,))``.

    An item is an image ``(C, H, W)``, a batch ``(n, C, H, W)``, or a tuple/list
    ``(images, labels)`` / ``(images, labels, indices)``; without indices the items are numbered
    by their position in the stream.
    """
    labels = indices = None
    if isinstance(item, (tuple, list)):
        if not 1 <= len(item) <= 3:
            raise ValueError(
                "data: items must be images or (images, labels[, indices]) tuples, "
                f"got a {type(item).__name__} of {len(item)} elements"
            )
        images, *rest = item
        labels = rest[0] if rest else None
        indices = rest[1] if len(rest) > 1 else None
    else:
        images = item
    if not isinstance(images, Tensor):
        raise TypeError(f"data: images must be torch.Tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4:
        raise ValueError(
            f"data: images must have shape (C, H, W) or (N, C, H, W), got {tuple(images.shape)}"
        )
    n = images.shape[0]
    label_t = None if labels is None else _as_long(labels, n, "data labels")
    if indices is None:
        index_t = torch.arange(position, position + n)
    else:
        index_t = _as_long(indices, n, "data indices")
    return images, label_t, index_t


def _rebatch(
    data: Iterable[Any], batch_size: int
) -> Iterator[tuple[Tensor, Tensor | None, Tensor]]:
    """Group the stream's images into batches of exactly ``batch_size`` (the last may be short)."""
    pending: list[tuple[Tensor, Tensor | None, Tensor]] = []
    count = position = 0
    for item in data:
        images, labels, index = _split_item(item, position)
        position += images.shape[0]
        pending.append((images, labels, index))
        count += images.shape[0]
        while count >= batch_size:
            batch, pending = _take(pending, batch_size)
            count -= batch_size
            yield batch
    if count:
        yield _take(pending, count)[0]


def _take(
    parts: list[tuple[Tensor, Tensor | None, Tensor]], size: int
) -> tuple[tuple[Tensor, Tensor | None, Tensor], list[tuple[Tensor, Tensor | None, Tensor]]]:
    """The first ``size`` images of ``parts`` as one batch, and what is left over."""
    taken: list[tuple[Tensor, Tensor | None, Tensor]] = []
    left = size
    while left:
        images, labels, index = parts[0]
        k = min(left, images.shape[0])
        taken.append((images[:k], None if labels is None else labels[:k], index[:k]))
        if k == images.shape[0]:
            parts = parts[1:]
        else:
            parts = [(images[k:], None if labels is None else labels[k:], index[k:]), *parts[1:]]
        left -= k
    if len(taken) == 1:  # a DataLoader batch of exactly batch_size: no copy
        return taken[0], parts
    sizes = {tuple(t[0].shape[1:]) for t in taken}
    if len(sizes) > 1:
        raise ValueError(
            f"data: images of one batch must have one size, got {sorted(sizes)} (items "
            f"{int(taken[0][2][0])}..{int(taken[-1][2][-1])}); resize them, or use batch_size=1"
        )
    has_labels = [t[1] is not None for t in taken]
    if any(has_labels) and not all(has_labels):
        raise ValueError("data: some items have labels and others do not")
    labels_out = torch.cat([t[1] for t in taken]) if all(has_labels) else None
    batch = (torch.cat([t[0] for t in taken]), labels_out, torch.cat([t[2] for t in taken]))
    return batch, parts


def explain_stream(
    model: nn.Module,
    data: Iterable[Any],
    layer: Layer | Sequence[Layer],
    *,
    method: str = "gradcam",
    targets: TargetsFrom | int = "top1",
    batch_size: int = 32,
    tft: bool = False,
    tft_options: Mapping[str, Any] | None = None,
    autocast: torch.dtype | None = None,
    memory_format: torch.memory_format | None = None,
    compile: bool = False,
    progress: bool = True,
    total: int | None = None,
    **method_options: Any,
) -> Iterator[Explanation]:
    """Explain a stream of images in batches of ``batch_size``; yield one Explanation per batch.

    Args:
        model: the classifier (never modified; explained in its current mode).
        data: an iterable of images ``(C, H, W)``, batches ``(n, C, H, W)``, or tuples
            ``(images, labels)`` / ``(images, labels, indices)`` (a ``DataLoader`` works as is).
            Images are moved to the model's device.
        layer: the layer(s) explained, as for the functional methods.
        method: a name from :data:`fastxai.METHODS`.
        targets: ``"top1"`` (each image's top-1 class), ``"labels"`` (the labels in ``data``),
            or one class index for every image.
        batch_size: images per explain call; the stream is regrouped to this size.
        tft: threshold fine-tuning of every map (:func:`fastxai.tft`), with ``tft_options``.
        autocast: run the model passes under ``torch.autocast`` with this dtype (maps stay in
            float32).
        memory_format: convert each batch (e.g. ``torch.channels_last``, matching a model the
            caller converted).
        compile: explain through ``torch.compile(fullgraph=True)`` of
            :class:`fastxai.nn.Explainer`; a short last batch is padded to ``batch_size`` (its
            padding rows dropped from the result) so the compiled graph is reused.
        progress: show a tqdm progress bar (images); ``total`` its length (default
            ``len(data.dataset)`` or ``len(data)`` when known).
        **method_options: options of the method (``batch_size`` of Score-CAM, ...).

    Yields:
        An :class:`~fastxai.Explanation` per batch with ``extras["index"]`` (the items' indices
        or stream positions) and ``extras["labels"]`` when the data has labels.
    """
    from tqdm.auto import tqdm

    from fastxai.nn import Explainer

    check_model(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not (targets in ("top1", "labels") or (isinstance(targets, int) and targets >= 0)):
        raise ValueError(f"targets must be 'top1', 'labels' or a class index, got {targets!r}")
    if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be torch.bfloat16, torch.float16 or None, got {autocast}")
    explainer = Explainer(
        model, layer, method=method, tft=tft, tft_options=dict(tft_options or {}), **method_options
    )
    run = torch.compile(explainer, fullgraph=True, dynamic=False) if compile else explainer
    device = model_device(model) or torch.device("cpu")
    if total is None:
        sized = getattr(data, "dataset", data)
        total = len(sized) if hasattr(sized, "__len__") else None
    bar = tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for images, labels, index in _rebatch(data, batch_size):
            n = images.shape[0]
            x = images.to(device, non_blocking=True)
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            if targets == "labels":
                if labels is None:
                    raise ValueError("targets='labels' but the data has no labels")
                batch_targets: Any = labels.to(device)
            else:
                batch_targets = None if targets == "top1" else targets
            if compile and n < batch_size:
                x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
                if isinstance(batch_targets, Tensor):  # class 0 for the padding rows
                    batch_targets = torch.cat([batch_targets, labels.new_zeros(batch_size - n)])
            # No grad: an explanation pass, not a training step (no graph, no buffer updated).
            autocasting = torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)
            with autocasting, torch.no_grad():
                _, explanation = run(x, batch_targets)
            if explanation.maps.shape[0] != n:
                explanation = _first_rows(explanation, n)
            explanation.extras["index"] = index
            if labels is not None:
                explanation.extras["labels"] = labels
            bar.update(n)
            yield explanation
    finally:
        bar.close()


def _first_rows(explanation: Explanation, n: int) -> Explanation:
    """The explanation of the first ``n`` images (drops the padding of a compiled last batch)."""
    batch = explanation.maps.shape[0]

    def cut(value: Any) -> Any:
        return value[:n] if isinstance(value, Tensor) and value.shape[:1] == (batch,) else value

    return Explanation(
        maps=cut(explanation.maps),
        targets=cut(explanation.targets),
        logits=cut(explanation.logits),
        raw=cut(explanation.raw),
        mask=cut(explanation.mask),
        tau=cut(explanation.tau),
        rpi=cut(explanation.rpi),
        extras={k: cut(v) for k, v in explanation.extras.items()},
    )


class _Indexed(torch.utils.data.Dataset):
    """``dataset`` restricted to ``indices``: item ``i`` is ``(image, label, indices[i])`` (label
    ``-1`` when the dataset yields bare images), or a :class:`FailedItem` when reading it
    raised."""

    def __init__(self, dataset: Any, indices: Tensor) -> None:
        self.dataset = dataset
        self.indices = indices.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int] | FailedItem:
        index = self.indices[i]
        try:
            item = self.dataset[index]
        except Exception as exc:  # an unreadable item is data, not a crash
            return FailedItem(index, describe_item(self.dataset, index), one_line(exc))
        if isinstance(item, (tuple, list)):
            image, label = item[0], (item[1] if len(item) > 1 else -1)
        else:
            image, label = item, -1
        return image, int(label), index


class FailedItem(NamedTuple):
    """An item that could not be read: its index, what it is (a file path when the dataset has
    ``files``) and why."""

    index: int
    item: str
    reason: str


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def describe_item(dataset: Any, index: int) -> str:
    files = getattr(dataset, "files", None)
    if isinstance(files, Sequence) and 0 <= index < len(files):
        return str(files[index])
    return f"item {index}"


def _collate_readable(items: list[Any]) -> tuple[Any, list[FailedItem]]:
    """``(default-collated readable items or None, failed items)``."""
    failed = [item for item in items if isinstance(item, FailedItem)]
    readable = [item for item in items if not isinstance(item, FailedItem)]
    batch = torch.utils.data.default_collate(readable) if readable else None
    return batch, failed


class ItemError(ValueError):
    """An item of a dataset job could not be read (raised with ``strict=True``)."""


FAILED_NAME = "failed-rank{rank}.json"


def explain_dataset(
    model: nn.Module,
    dataset: Any,
    layer: Layer | Sequence[Layer],
    out: str | os.PathLike[str],
    *,
    method: str = "gradcam",
    targets: TargetsFrom | int = "top1",
    batch_size: int = 32,
    tft: bool = False,
    tft_options: Mapping[str, Any] | None = None,
    shard_size: int = 1024,
    num_workers: int = 0,
    maps_dtype: torch.dtype = torch.float16,
    autocast: torch.dtype | None = None,
    memory_format: torch.memory_format | None = None,
    compile: bool = False,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
    strict: bool = False,
    restart: bool = False,
    **method_options: Any,
) -> int:
    """Explain every item of a map-style ``dataset`` and write the results as shards to ``out``.

    Items are images ``(C, H, W)`` or ``(image, label, ...)``. Each shard (see
    :mod:`fastxai.io`) holds ``index``, ``maps`` (stored as ``maps_dtype``), ``targets`` and,
    with TFT, ``mask`` and ``tau``; :func:`fastxai.io.read_shards` reads them back in index
    order. A restarted job explains only the items no complete shard holds.

    The job's identity (method, layer, targets, TFT options, autocast, memory format, method
    options, the dataset (file paths and sizes when it has ``files``, else its type and length),
    a hash of the model's weights, the fastxai version, and ``meta``) is kept in
    ``out/meta.json``; resuming with another identity raises a ``ValueError`` naming the
    difference. ``restart=True`` deletes the folder's earlier results first.

    An item whose reading raises (a corrupt image) is recorded, with what it is and why, in
    ``out/failed-rank{r}.json``, a warning says how many failed, and the job goes on (a resume
    tries them again); ``strict=True`` raises :class:`ItemError` naming the first one instead.

    Under ``torchrun`` (an initialised process group, or ``WORLD_SIZE > 1`` in the environment,
    in which case a gloo/nccl group is started here) the pending items are split over the ranks
    with ``DistributedSampler(shuffle=False)``; each rank writes its own shards. Ranks must load
    the same model (seed random weights). Returns the number of items this rank wrote.

    Other arguments are those of :func:`explain_stream`.
    """

    from fastxai.identity import job_identity
    from fastxai.io import ShardWriter, atomic_write_json, remove_results

    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"dataset must be a map-style dataset, got {type(dataset).__name__}")
    rank, world = process_group(model)
    job = job_identity(
        model,
        dataset,
        method=method,
        layer=normalise_layers(model, layer),
        targets=targets,
        tft=bool(tft),
        tft_options=dict(tft_options or {}),
        maps_dtype=str(maps_dtype),
        autocast=str(autocast),
        memory_format=str(memory_format),
        method_options=method_options,
        **dict(meta or {}),
    )
    if restart and rank == 0:
        remove_results(out)
    if restart and world > 1:
        dist.barrier()
    fields = ["maps", "targets", *(["mask", "tau"] if tft else [])]
    failed: list[FailedItem] = []
    with ShardWriter(out, shard_size=shard_size, rank=rank, meta=job, fields=fields) as writer:
        pending = writer.pending(range(len(dataset)))
        if world > 1:
            dist.barrier()  # every rank reads the finished items before any rank writes
        subset = _Indexed(dataset, pending)
        sampler = None
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(
                subset, num_replicas=world, rank=rank, shuffle=False
            )
        loader = torch.utils.data.DataLoader(
            subset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=_collate_readable,
        )

        def readable() -> Iterator[Any]:
            for batch, bad in loader:
                if bad and strict:
                    first = bad[0]
                    raise ItemError(f"{first.item}: {first.reason} (strict: the job stops here)")
                failed.extend(bad)
                if batch is not None:
                    yield batch

        written = 0
        stream = explain_stream(
            model,
            readable(),
            layer,
            method=method,
            targets=targets,
            batch_size=batch_size,
            tft=tft,
            tft_options=tft_options,
            autocast=autocast,
            memory_format=memory_format,
            compile=compile,
            progress=progress and rank == 0,
            total=len(sampler) if sampler is not None else len(subset),
            **method_options,
        )
        for explanation in stream:
            fields_out = {"maps": explanation.maps.to(maps_dtype), "targets": explanation.targets}
            if tft:
                fields_out["mask"] = explanation.mask
                fields_out["tau"] = explanation.tau.float()
            writer.write(explanation.extras["index"], **fields_out)
            written += len(explanation)
    record = Path(out) / FAILED_NAME.format(rank=rank)
    if failed:
        atomic_write_json({"failed": [f._asdict() for f in failed]}, record)
        warnings.warn(
            f"explain_dataset: {len(failed)} item(s) could not be read and were skipped "
            f"(first: {failed[0].item}: {failed[0].reason}); listed in {record}",
            stacklevel=2,
        )
    else:
        record.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()  # every shard is on disk when any rank returns
    return written


def process_group(model: nn.Module) -> tuple[int, int]:
    """``(rank, world_size)``; joins torchrun's process group (on the model's device) when the
    environment describes one (:func:`fastxai.distributed.init_from_env`)."""
    from fastxai.distributed import init_from_env

    context = init_from_env(str(model_device(model) or "cpu"))
    return context.rank, context.world_size


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageFiles(torch.utils.data.Dataset):
    """The images under ``root`` in sorted path order, preprocessed for the model.

    With class sub-folders (``root/<class>/<image>``, torchvision's ImageFolder layout) an item
    is ``(image, class_index)`` with classes numbered in sorted folder order; otherwise ``label``
    is ``-1``.
    """

    def __init__(self, root: str | os.PathLike[str], preprocess: Any) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"IMAGE_DIR: no such folder: {root}")
        self.files = sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.files:
            raise ValueError(f"IMAGE_DIR: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        folders = sorted({p.parent for p in self.files})
        self.labelled = all(folder.parent == self.root for folder in folders)
        self.classes = [folder.name for folder in folders] if self.labelled else []
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        path = self.files[i]
        with Image.open(path) as picture:
            image = self.preprocess(picture.convert("RGB"))[0]
        label = self.classes.index(path.parent.name) if self.labelled else -1
        return image, label
