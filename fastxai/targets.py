"""What each image is explained for: class indices or pytorch-grad-cam style callables."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree
from torch import Tensor

TargetCallable = Callable[[Tensor], Tensor]
Targets = None | int | Sequence[int] | Tensor | TargetCallable | Sequence[TargetCallable]


def _as_class_index(target: Any) -> int | None:
    """pytorch-grad-cam's ``ClassifierOutputTarget(c)`` is exactly class ``c``: the fast path."""
    if type(target).__name__ == "ClassifierOutputTarget" and isinstance(
        getattr(target, "category", None), int
    ):
        return int(target.category)
    return None


@dataclass
class ResolvedTargets:
    """Per-image targets for a batch.

    Attributes:
        classes: ``(N,)`` long class index per image, ``-1`` where a callable is used.
        callables: one callable per image (mapping that image's 1-D output to a scalar), or
            ``None`` when every target is a class index.
    """

    classes: Tensor
    callables: list[TargetCallable] | None

    def scores(self, logits: Any, image_index: Tensor | None = None) -> Tensor:
        """Target score of each row of ``logits`` (rows belong to images ``image_index``); for a
        list of per-image outputs, each callable's score of its image's output."""
        if not isinstance(logits, Tensor):
            index = range(len(logits)) if image_index is None else image_index.tolist()
            pairs = zip(index, logits, strict=True)
            return torch.stack([torch.as_tensor(self.callables[n](out)).sum() for n, out in pairs])
        if image_index is None:
            image_index = torch.arange(logits.shape[0], device=logits.device)
        if self.callables is None:
            return logits.gather(1, self.classes[image_index][:, None])[:, 0]
        index = image_index.tolist()
        rows = zip(index, logits, strict=True)
        return torch.stack([torch.as_tensor(self.callables[n](row)).sum() for n, row in rows])

    def cotangent(self, logits: Tensor) -> Tensor:
        """:math:`\\partial \\sum_n s_n / \\partial \\text{logits}` (one-hot rows for classes)."""
        if self.callables is None:
            onehot = torch.zeros_like(logits)
            onehot.scatter_(1, self.classes[:, None], 1.0)
            return onehot
        out = logits.detach().requires_grad_(True)
        with torch.enable_grad():
            total = self.scores(out).sum()
            (grad,) = torch.autograd.grad(total, out)
        return grad


def resolve_targets(targets: Targets, logits: Any) -> ResolvedTargets:
    """Turn the user's ``targets`` into per-image class indices or callables.

    ``None``: the top-1 class of each image. An int, or a single callable: the same for every
    image. A sequence or 1-D tensor: one entry per image (its length must equal the batch size;
    unlike pytorch-grad-cam, a mismatch is an error, not a silent truncation). A model whose
    output is not ``(N, num_classes)`` logits (segmentation scores ``(N, K, H, W)``, a binary
    classifier's ``(N,)``, a detector's list of per-image dicts) is explained through
    callables only.
    """
    if not isinstance(logits, Tensor):
        return _resolve_per_image_outputs(targets, logits)
    n, device = logits.shape[0], logits.device
    if logits.dim() != 2 and not _all_callables(targets):
        raise ValueError(
            f"targets: the model returns {tuple(logits.shape)}, not (N, num_classes) logits, so "
            "there is no class index to explain; pass callables that map one image's output "
            "to a scalar (fastxai.compat.utils.model_targets, e.g. SemanticSegmentationTarget)"
        )
    num_classes = logits.shape[1] if logits.dim() == 2 else 0
    if targets is None:
        return ResolvedTargets(logits.argmax(1), None)
    if type(targets).__module__ == "numpy" and hasattr(targets, "dtype"):
        if targets.dtype.kind not in "iu":  # NumPy arrays and scalars of integers only
            raise ValueError(f"targets: expected NumPy integers, got dtype {targets.dtype}")
        targets = torch.as_tensor(targets)
    if isinstance(targets, Tensor):
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.dim() > 1:
            raise ValueError(
                f"targets: expected an integer tensor of shape () or ({n},), "
                f"got {targets.dtype} of shape {tuple(targets.shape)}"
            )
        return _resolve_tensor_targets(targets, n, num_classes, device)
    if isinstance(targets, int) or callable(targets):
        targets = [targets] * n
    if not isinstance(targets, Sequence) or isinstance(targets, str):
        raise TypeError(
            f"targets: expected None, an int, a callable or one per image, got {type(targets)}"
        )
    if len(targets) != n:
        raise ValueError(f"targets has {len(targets)} entries for a batch of {n} images")
    classes: list[int] = []
    callables: list[TargetCallable] = []
    for t in targets:
        index = _as_class_index(t)
        if index is None and isinstance(t, numbers.Integral) and not isinstance(t, bool):
            index = int(t)  # Python and NumPy integers
        if index is not None:
            if not 0 <= index < num_classes:
                raise ValueError(
                    f"targets: class {index} is outside [0, {num_classes}) for this model"
                )
            classes.append(index)
            callables.append(_ClassTarget(index))
        elif callable(t):
            classes.append(-1)
            callables.append(t)
        else:
            raise TypeError(f"targets: entries must be ints or callables, got {type(t).__name__}")
    class_tensor = torch.tensor(classes, dtype=torch.long, device=device)
    if all(c >= 0 for c in classes):
        return ResolvedTargets(class_tensor, None)
    return ResolvedTargets(class_tensor, callables)


def _resolve_per_image_outputs(targets: Targets, outputs: Sequence[Any]) -> ResolvedTargets:
    """Targets for a model that returns one output per image (a list of dicts, for example):
    callables only, each given its image's output."""
    n = len(outputs)
    if not _all_callables(targets):
        kind = type(outputs[0]).__name__ if n else "nothing"
        raise ValueError(
            f"targets: the model returns a list of {n} per-image outputs ({kind}), not "
            "(N, num_classes) logits; pass callables that map one image's output to a scalar "
            "(e.g. fastxai.compat.utils.model_targets.FasterRCNNBoxScoreTarget)"
        )
    callables = list(targets) if isinstance(targets, Sequence) else [targets] * n
    if len(callables) != n:
        raise ValueError(f"targets has {len(callables)} entries for a batch of {n} images")
    device = next(
        (t.device for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, Tensor)),
        torch.device("cpu"),
    )
    return ResolvedTargets(torch.full((n,), -1, dtype=torch.long, device=device), callables)


def _all_callables(targets: Targets) -> bool:
    """``targets`` is one callable, or a non-empty sequence of callables, none a class index."""
    entries = [targets] if callable(targets) else targets
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        return False
    return all(callable(t) and _as_class_index(t) is None for t in entries)


def _resolve_tensor_targets(
    targets: Tensor, n: int, num_classes: int, device: torch.device
) -> ResolvedTargets:
    """Class indices given as a tensor: stays on the device and compiles without a graph break.

    The range check reads the values, so it runs in eager mode only; under
    ``torch.compiler.is_compiling()`` it is skipped (an out-of-range class then fails inside
    ``gather``/``scatter`` instead of with this message).
    """
    if targets.dim() == 1 and targets.shape != (n,):
        raise ValueError(f"targets has {targets.numel()} entries for a batch of {n} images")
    classes = targets.to(device=device, dtype=torch.long).reshape(-1).expand(n)
    if not torch.compiler.is_compiling() and n:
        low, high = int(classes.min()), int(classes.max())
        bad = low if low < 0 else high
        if not 0 <= bad < num_classes:
            raise ValueError(f"targets: class {bad} is outside [0, {num_classes}) for this model")
    return ResolvedTargets(classes.clone(), None)  # never an alias of the caller's tensor


class _ClassTarget:
    def __init__(self, index: int) -> None:
        self.index = index

    def __call__(self, output: Tensor) -> Tensor:
        return output[self.index]
