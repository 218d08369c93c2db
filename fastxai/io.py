"""Atomic, sharded, resumable storage of per-item tensors (AFT masks, dataset explain jobs).

A job that explains or masks a whole dataset writes its results item by item through a
:class:`ShardWriter`. Items are buffered and written in shards of ``shard_size`` items; each shard
is one ``torch.save`` file written to a temporary name in the same folder and moved into place with
:func:`os.replace`, so a shard on disk is always complete. A job that is killed loses at most the
items still in its buffer: on restart, :meth:`ShardWriter.pending` returns the indices no complete
shard holds yet, and the job explains only those.

Each rank of a distributed job writes its own shards (``rank{r}-{k:06d}.pt``), so ranks never
write the same file; :func:`read_shards` reads every rank's shards back in index order.

Damage from outside (a disk that filled up, a file truncated or overwritten by hand) is named,
not crashed on: a writer starting on a folder removes its rank's leftover temporary files,
renames a damaged shard of its rank to ``<name>.damaged`` with a one-line warning (its items are
then pending again, so the job re-does them), and :func:`read_shards` refuses a damaged shard
with a :class:`DamagedShardError` that names the file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DamagedShardError",
    "ShardWriter",
    "atomic_save",
    "atomic_write_json",
    "completed_indices",
    "read_meta",
    "read_shards",
    "remove_results",
]

_SHARD_NAME = re.compile(r"^rank(\d+)-(\d{6})\.pt$")
_META_NAME = "meta.json"


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` through a temporary file and :func:`os.replace`.

    A reader (or a job restarted after a kill) sees either the previous file or the complete new
    one, never a prefix of it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _shard_files(root: Path) -> Iterator[tuple[int, int, Path]]:
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        match = _SHARD_NAME.match(entry.name)
        if match:
            yield int(match.group(1)), int(match.group(2)), entry


class DamagedShardError(ValueError):
    """A shard file that is not a complete shard: unreadable, or not the fields it should hold."""


def _load_shard(path: Path, fields: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The shard at ``path``; :class:`DamagedShardError` naming it when it cannot be read or is
    not a dict of tensors with one row per ``index`` entry (and exactly ``fields`` besides
    ``index``, when given)."""
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, empty, random bytes, an unsafe pickle
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DamagedShardError(f"{path}: not a readable shard ({reason[:120]})") from None
    if not isinstance(shard, dict) or not isinstance(shard.get("index"), torch.Tensor):
        raise DamagedShardError(f"{path}: not a shard (expected a dict with an 'index' tensor)")
    index = shard["index"]
    if index.dim() != 1 or index.dtype != torch.long:
        raise DamagedShardError(f"{path}: 'index' must be a 1-D long tensor")
    for name, value in shard.items():
        if not isinstance(value, torch.Tensor) or value.shape[:1] != index.shape:
            raise DamagedShardError(f"{path}: field {name!r} does not have one row per item")
    if fields is not None and set(shard) != {*fields, "index"}:
        raise DamagedShardError(
            f"{path}: holds fields {sorted(set(shard) - {'index'})}, expected {sorted(fields)}"
        )
    return shard


def completed_indices(
    root: str | os.PathLike[str], fields: Sequence[str] | None = None
) -> torch.Tensor:
    """Sorted 1-D long tensor of every item index held by a complete shard under ``root``
    (a damaged shard raises :class:`DamagedShardError`)."""
    parts = [_load_shard(path, fields)["index"] for _, _, path in _shard_files(Path(root))]
    if not parts:
        return torch.empty(0, dtype=torch.long)
    return torch.cat(parts).unique()


class ShardWriter:
    """Buffer per-item tensors and write them as complete shards.

    Args:
        root: output folder (created if missing).
        shard_size: items per shard file; the last shard of a run may hold fewer.
        rank: this process's rank; shards are named ``rank{rank}-{k:06d}.pt``.
        meta: JSON-serialisable description of the job (method, layer, thresholds ...). Written
            once as ``meta.json``; a restart with a different ``meta`` raises ``ValueError``
            instead of mixing results of two different jobs in one folder.
        fields: the fields every shard holds besides ``index``, when known: a shard of this
            rank with other fields counts as damaged.

    Usage::

        with ShardWriter("masks/", shard_size=1024, meta={"method": "gradcam"}) as writer:
            todo = writer.pending(range(len(dataset)))
            for batch_indices in todo.split(64):
                writer.write(batch_indices, mask=masks_for(batch_indices))
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        shard_size: int = 1024,
        rank: int = 0,
        meta: Mapping[str, Any] | None = None,
        fields: Sequence[str] | None = None,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer, got {shard_size}")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.root = Path(root)
        self.shard_size = int(shard_size)
        self.rank = int(rank)
        self.fields = None if fields is None else list(fields)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"out: {self.root} is a file, expected a folder")
        self.root.mkdir(parents=True, exist_ok=True)  # ranks may create it at the same time
        self._check_meta(meta)
        self._clean_up()
        own = [number for r, number, _ in _shard_files(self.root) if r == self.rank]
        self._next_shard = max(own, default=-1) + 1
        self._buffer: list[dict[str, torch.Tensor]] = []
        self._buffered = 0

    def _check_meta(self, meta: Mapping[str, Any] | None) -> None:
        if meta is None:
            return
        meta_path = self.root / _META_NAME
        wanted = json.loads(json.dumps(dict(meta)))
        if meta_path.exists():
            found = _read_json(meta_path)
            if found != wanted:
                raise ValueError(
                    f"{self.root} holds results of another job: {_difference(found, wanted)}"
                )
            return
        if any(True for _ in _shard_files(self.root)):
            raise ValueError(
                f"{self.root} holds shards but no {_META_NAME}, so which job wrote them is "
                "unknown; use a new folder or delete the old shards"
            )
        if self.rank == 0:
            atomic_write_json(wanted, meta_path)

    def _clean_up(self) -> None:
        """Remove this rank's temporary files left by a killed run; set aside its damaged
        shards (``<name>.damaged``, with a warning) so that their items are re-done."""
        leftover = re.compile(rf"^\.rank{self.rank}-\d{{6}}\.pt\..*\.tmp$")
        meta_leftover = re.compile(rf"^\.{re.escape(_META_NAME)}\.\d+\.tmp$")
        for entry in self.root.iterdir():
            if leftover.match(entry.name) or (self.rank == 0 and meta_leftover.match(entry.name)):
                entry.unlink(missing_ok=True)
        for rank, _, path in _shard_files(self.root):
            if rank != self.rank:
                continue
            try:
                _load_shard(path, self.fields)
            except DamagedShardError as exc:
                os.replace(path, path.with_name(path.name + ".damaged"))
                warnings.warn(
                    f"{exc}; moved to {path.name}.damaged, its items will be re-done",
                    stacklevel=3,
                )

    def pending(self, indices: Iterable[int] | torch.Tensor) -> torch.Tensor:
        """The subset of ``indices`` (order kept) that no complete shard holds yet."""
        indices = torch.as_tensor(list(indices) if not torch.is_tensor(indices) else indices)
        indices = indices.to(torch.long).reshape(-1)
        done = completed_indices(self.root, self.fields)
        if done.numel() == 0:
            return indices
        return indices[~torch.isin(indices, done)]

    def write(self, indices: torch.Tensor | Iterable[int], **fields: torch.Tensor) -> None:
        """Buffer the items ``indices`` with one row of each field per item.

        Every field must have ``len(indices)`` rows; tensors are detached and moved to the CPU.
        Full shards are written at once; the remainder waits for more items or :meth:`close`.
        """
        index = torch.as_tensor(
            indices if torch.is_tensor(indices) else list(indices), dtype=torch.long
        ).reshape(-1)
        if "index" in fields:
            raise ValueError("'index' is reserved for the item indices; rename that field")
        if not fields:
            raise ValueError("write() needs at least one field, e.g. write(indices, mask=masks)")
        for name, value in fields.items():
            if not torch.is_tensor(value) or value.shape[:1] != index.shape:
                raise ValueError(
                    f"field {name!r} must be a tensor with {index.numel()} rows (one per index), "
                    f"got {getattr(value, 'shape', type(value).__name__)}"
                )
        if self._buffer and set(fields) != set(self._buffer[0]) - {"index"}:
            raise ValueError(
                f"fields {sorted(fields)} differ from the earlier {sorted(self._buffer[0])}"
            )
        item = {name: value.detach().cpu() for name, value in fields.items()}
        item["index"] = index.cpu()
        self._buffer.append(item)
        self._buffered += index.numel()
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        parts = self._buffer
        merged = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        shard = {name: value[:count].clone() for name, value in merged.items()}
        rest = {name: value[count:] for name, value in merged.items()}
        atomic_save(shard, self.root / f"rank{self.rank}-{self._next_shard:06d}.pt")
        self._next_shard += 1
        self._buffered -= count
        self._buffer = [rest] if self._buffered else []

    def close(self) -> None:
        """Write the buffered remainder as a last, shorter shard."""
        if self._buffered:
            self._flush(self._buffered)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        # On an exception the buffer is dropped on purpose: those items are re-done on resume.
        if exc_type is None:
            self.close()


def read_shards(root: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every field of every complete shard under ``root``, concatenated and sorted by index.

    Returns a dict with ``"index"`` (sorted, long) and one tensor per field. An item written
    twice (possible when two ranks overlap) is kept once. A damaged shard raises
    :class:`DamagedShardError` naming it (resuming the job re-does its items).
    """
    paths = [path for _, _, path in _shard_files(Path(root))]
    shards: list[dict[str, torch.Tensor]] = []
    for path in paths:
        try:
            shards.append(_load_shard(path, shards[0].keys() - {"index"} if shards else None))
        except DamagedShardError as exc:
            raise DamagedShardError(f"{exc}; rerun the job on this folder to redo it") from None
    if not shards:
        raise FileNotFoundError(f"no complete shards (rank*-NNNNNN.pt) under {root}")
    merged = {name: torch.cat([shard[name] for shard in shards]) for name in shards[0]}
    index, order = merged["index"].sort(stable=True)
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[1:] = index[1:] != index[:-1]
    return {name: value[order][keep] for name, value in merged.items()}


def read_meta(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` a :class:`ShardWriter` wrote under ``root`` (empty dict if none)."""
    meta_path = Path(root) / _META_NAME
    return _read_json(meta_path) if meta_path.exists() else {}


def _difference(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    """One line naming how two job descriptions differ, and the ways out."""
    keys = sorted(
        k for k in {*found, *wanted} if found.get(k, "<absent>") != wanted.get(k, "<absent>")
    )
    first = keys[0]
    more = f" (and {len(keys) - 1} more: {', '.join(keys[1:])})" if len(keys) > 1 else ""
    was, now = found.get(first, "<absent>"), wanted.get(first, "<absent>")
    return (
        f"its {first} was {was!r}, this job's is {now!r}{more}; start afresh with "
        "restart=True (CLI: --restart) or use a new folder"
    )


def atomic_write_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and :func:`os.replace`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def remove_results(root: str | os.PathLike[str]) -> None:
    """Delete the files a job wrote under ``root`` (shards, set-aside damaged shards, their
    temporary files, ``meta.json``, failure records); other files stay."""
    root = Path(root)
    if not root.is_dir():
        return
    ours = re.compile(
        r"^(rank\d+-\d{6}\.pt(\.damaged)?|\.rank\d+-\d{6}\.pt\..*\.tmp|meta\.json|"
        r"\.meta\.json\.\d+\.tmp|failed-rank\d+\.json)$"
    )
    for entry in root.iterdir():
        if entry.is_file() and ours.match(entry.name):
            entry.unlink()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path}: not readable JSON ({exc}); restore it, start afresh with restart=True "
            "(CLI: --restart), or use a new folder"
        ) from None
    if not isinstance(found, dict):
        raise ValueError(f"{path}: expected a JSON object; start the job in a new folder")
    return found
