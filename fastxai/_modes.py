"""Explaining a model in training mode without changing it.

A model in training mode is explained as it is: BatchNorm normalises with the batch's statistics,
Dropout drops. What training mode would also do, update BatchNorm's running statistics and
``num_batches_tracked``, is switched off for the duration of a call: each such layer runs with
``track_running_stats`` off (PyTorch then normalises with batch statistics and writes nothing),
which also avoids ``torch.func``'s error for an in-place update of a captured buffer inside the
gradient pass. Every buffer is compared after the call and any other in-place change (a custom
module's counter) is undone, whether the call returned or raised.

The one exception is a call that is the forward of a training step (``logits_graph`` or
``create_graph`` with grad enabled, :class:`fastxai.nn.Explainer`): its one forward of the model
updates the buffers as ``model(x)`` would (once), and only a call that raises gives them back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

P = ParamSpec("P")
R = TypeVar("R")


def _stat_trackers(model: nn.Module) -> list[_NormBase]:
    return [
        m
        for m in model.modules()
        if isinstance(m, _NormBase) and m.training and m.track_running_stats
    ]


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Run the block with ``model``'s buffers unchanged; free when no module is in training
    mode (the usual case) and under ``torch.compile``."""
    if torch.compiler.is_compiling() or not any(m.training for m in model.modules()):
        yield
        return
    trackers = _stat_trackers(model)
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    for m in trackers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in trackers:
            m.track_running_stats = True
        with torch.no_grad():
            for buffer, copy in saved:
                if not torch.equal(buffer, copy):
                    buffer.copy_(copy)


@contextmanager
def buffers_restored_on_error(model: nn.Module) -> Iterator[None]:
    """Run the block, which may update ``model``'s buffers (the model's own forward in training
    mode), and give every buffer its value back if the block raises; free when no module is in
    training mode and under ``torch.compile``."""
    if torch.compiler.is_compiling() or not any(m.training for m in model.modules()):
        yield
        return
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)
        raise


@contextmanager
def evaluated(model: nn.Module) -> Iterator[None]:
    """Run the block with every module of ``model`` in eval mode, then give each its own mode
    back (whether the block returned or raised); free for a model already in eval mode."""
    modes = [(m, m.training) for m in model.modules()]
    if torch.compiler.is_compiling() or not any(training for _, training in modes):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def keeps_buffers(function: Callable[P, R]) -> Callable[P, R]:
    """Decorate an entry point whose first argument is the model with :func:`buffers_kept`."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if torch.compiler.is_compiling():
            return function(*args, **kwargs)
        model = args[0] if args else kwargs.get("model")
        if not isinstance(model, nn.Module) or not any(m.training for m in model.modules()):
            return function(*args, **kwargs)
        with buffers_kept(model):
            return function(*args, **kwargs)

    return wrapper
