"""Argument checks and the fake (shape) kernels of ``fastxai::scale_maps`` and
``fastxai::fuse_maps``, shared by their front doors, fakes and Triton kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FUSIONS = ("mean", "tanh")


def check_scale_maps_inputs(raw: Tensor, height: int, width: int) -> None:
    """The C++ kernels' argument checks of ``scale_maps``."""
    torch._check(raw.dim() == 3, lambda: f"scale_maps: raw must be (N, h, w), got {raw.dim()} dims")
    torch._check(height > 0, lambda: f"scale_maps: height must be positive, got {height}")
    torch._check(width > 0, lambda: f"scale_maps: width must be positive, got {width}")
    torch._check(
        raw.shape[1] > 0 and raw.shape[2] > 0,
        lambda: (
            f"scale_maps: raw maps must be non-empty, got (h, w) = ({raw.shape[1]}, {raw.shape[2]})"
        ),
    )


def scale_maps_fake(raw: Tensor, height: int, width: int) -> Tensor:
    """Shape of ``scale_maps``: ``(N, h, w) -> (N, height, width)``, same dtype and device."""
    check_scale_maps_inputs(raw, height, width)
    return raw.new_empty((raw.shape[0], height, width))


def check_fuse_maps_inputs(raws: Sequence[Tensor], height: int, width: int, fusion: str) -> None:
    """The C++ kernels' argument checks (``csrc/include/fastxai/fuse_maps_checks.h``), for the
    fake and Triton paths."""
    torch._check(
        fusion in FUSIONS, lambda: f"fuse_maps: fusion must be 'mean' or 'tanh', got '{fusion}'"
    )
    torch._check(len(raws) > 0, lambda: "fuse_maps: raws must hold at least one map")
    torch._check(height > 0, lambda: f"fuse_maps: height must be positive, got {height}")
    torch._check(width > 0, lambda: f"fuse_maps: width must be positive, got {width}")
    for index, raw in enumerate(raws):
        _check_map(index, raw, raws[0])


def _check_map(index: int, raw: Tensor, first: Tensor) -> None:
    torch._check(
        raw.dim() == 3, lambda: f"fuse_maps: raws[{index}] must be (N, h, w), got {raw.dim()} dims"
    )
    torch._check(
        raw.shape[0] == first.shape[0],
        lambda: (
            f"fuse_maps: every map needs the batch size of raws[0] ({first.shape[0]}), "
            f"raws[{index}] has {raw.shape[0]}"
        ),
    )
    torch._check(
        raw.shape[1] > 0 and raw.shape[2] > 0,
        lambda: (
            f"fuse_maps: raws[{index}] maps must be non-empty, got (h, w) = "
            f"({raw.shape[1]}, {raw.shape[2]})"
        ),
    )
    torch._check(
        raw.dtype == first.dtype and raw.device == first.device,
        lambda: f"fuse_maps: every map needs the dtype and device of raws[0], raws[{index}]",
    )


def fuse_maps_fake(raws: list[Tensor], height: int, width: int, fusion: str) -> Tensor:
    """Shape of ``fuse_maps``: ``(N, height, width)`` in the dtype and on the device of ``raws``."""
    check_fuse_maps_inputs(raws, height, width, fusion)
    return raws[0].new_empty((raws[0].shape[0], height, width))
