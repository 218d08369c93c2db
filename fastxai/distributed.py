"""The distributed context of a job: one process, or one rank of a ``torchrun`` launch.

Code written against :class:`Context` runs unchanged under ``python`` and under
``torchrun --nproc_per_node=N`` (and torchrun's multi-node launch): :func:`init_from_env` starts
the process group from torchrun's environment (gloo on CPU, nccl on GPU) when ``WORLD_SIZE > 1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """``rank`` of ``world_size`` processes; ``device`` is where this rank computes."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def current(device: torch.device | str | None = None) -> Context:
    """The context of an already initialised process group (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    return Context(rank, world, torch.device(device) if device is not None else _default_device())


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` this machine has; a ``ValueError`` naming it
    otherwise."""
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    count = torch.cuda.device_count() if chosen.type == "cuda" else 0
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= count:
        raise ValueError(f"--device {device}: this machine has {count} GPU(s)")
    return chosen


def init_from_env(device: str | None = None) -> Context:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...).

    Backend: nccl for a CUDA device, gloo otherwise. A plain ``python`` run (no ``WORLD_SIZE``
    or ``WORLD_SIZE=1``) starts no group and returns the single-process context.
    """
    chosen = parse_device(device) if device is not None else _default_device()
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return current(chosen)


def shutdown() -> None:
    """Leave the process group, if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
