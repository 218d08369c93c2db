"""What decides a job's results, as JSON for ``meta.json``: a resumed job whose identity differs
from the one that wrote the folder is refused instead of mixing two jobs' results."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def job_identity(model: nn.Module, dataset: Any, /, **settings: Any) -> dict[str, Any]:
    """What decides a dataset job's results, as JSON: ``settings``, the dataset, a hash of
    the model's weights and the fastxai version."""
    from fastxai._version import __version__

    identity = json.loads(json.dumps(settings, sort_keys=True, default=repr))
    identity["dataset"] = dataset_identity(dataset)
    identity["model_weights"] = weights_digest(model)
    identity["fastxai"] = __version__
    return identity


def dataset_identity(dataset: Any) -> str:
    """``sha1`` of the relative paths and sizes of ``dataset.files`` (when it has them, relative
    to ``dataset.root``), else the dataset's type and length."""
    files = getattr(dataset, "files", None)
    if not isinstance(files, Sequence):
        return f"{type(dataset).__name__} of {len(dataset)} items"
    root = getattr(dataset, "root", None)
    digest = hashlib.sha1()
    for path in files:
        path = Path(path)
        name = path.relative_to(root) if root is not None else path
        size = path.stat().st_size if path.exists() else -1
        digest.update(f"{name.as_posix()}\t{size}\n".encode())
    return f"{len(files)} files, sha1 {digest.hexdigest()}"


def weights_digest(model: nn.Module) -> str:
    """``sha1`` of the model's parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, Tensor):
            digest.update(name.encode())
            _update(digest, tensor)
    return digest.hexdigest()


def tensor_digest(t: Tensor) -> str:
    """``sha1`` of a tensor's dtype, shape and bytes."""
    digest = hashlib.sha1()
    _update(digest, t)
    return digest.hexdigest()


def _update(digest: Any, t: Tensor) -> None:
    digest.update(f":{t.dtype}:{tuple(t.shape)};".encode())
    digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
