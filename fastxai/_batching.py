"""Chunking of many perturbed inputs under a memory bound, and their class probabilities."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

# Bytes of perturbed inputs per forward batch. CPUs run convolutions fastest on small batches
# (resnet50 at 224 on 2 cores: 80 images in chunks of 8 took 3.4-4.6 s, in one batch 9.3-9.7 s);
# GPUs want large ones. The network's own activations come on top of this.
PERTURBED_BATCH_BYTES = {"cpu": 5 * 2**20}
PERTURBED_BATCH_BYTES_DEFAULT = 64 * 2**20


def no_autograd() -> contextlib.AbstractContextManager[None]:
    """``torch.inference_mode()`` in eager mode; ``torch.no_grad()`` under ``torch.compile``,
    where Inductor cannot give inference tensors the version counters its graph needs."""
    return torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode()


def rows_per_batch(sample: Tensor, batch_size: int | None) -> int:
    """``batch_size`` if given (it must be >= 1), else as many rows shaped like ``sample[0]`` as
    fit in the device's :data:`PERTURBED_BATCH_BYTES` budget."""
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        return batch_size
    row_bytes = sample[0].numel() * sample.element_size() if sample.shape[0] else 1
    budget = PERTURBED_BATCH_BYTES.get(sample.device.type, PERTURBED_BATCH_BYTES_DEFAULT)
    return max(1, budget // max(row_bytes, 1))


def class_probabilities(
    model: nn.Module, images: Tensor, classes: Tensor, batch_size: int | None = None
) -> Tensor:
    """Softmax probability of ``classes[i]`` for ``images[i]``, batched: ``(M,)`` float32."""
    rows = rows_per_batch(images, batch_size)
    out = []
    with no_autograd():
        for start in range(0, images.shape[0], rows):
            probs = torch.softmax(model(images[start : start + rows]).float(), dim=1)
            out.append(probs.gather(1, classes[start : start + rows, None])[:, 0])
    return torch.cat(out) if out else images.new_zeros(0, dtype=torch.float32)


def batched_logits(model: nn.Module, images: Tensor, batch_size: int | None = None) -> Tensor:
    """``model(images)`` in chunks of :func:`rows_per_batch` rows: ``(M, K)`` float32."""
    rows = rows_per_batch(images, batch_size)
    with no_autograd():
        out = [model(images[start : start + rows]).float() for start in range(0, len(images), rows)]
    if not out:
        raise ValueError("batched_logits: no images to evaluate")
    return torch.cat(out)
