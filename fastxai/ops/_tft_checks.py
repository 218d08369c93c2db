"""Argument checks and fake (shape) kernels of the TFT ops, shared by their front doors
(:mod:`fastxai.ops._tft_ops`) and their Triton kernels."""

from __future__ import annotations

import torch
from torch import Tensor


def check_ladder_inputs(
    op: str,
    maps: Tensor,
    images: Tensor,
    thresholds: Tensor,
    mode: str,
    mask: str,
    *,
    at_input_resolution: bool,
    kernel: bool = True,
) -> None:
    """The C++ kernels' argument checks (``csrc/include/fastxai/tft_checks.h``), for the fake,
    Triton and reference paths; ``kernel=False`` allows mixed dtypes (the reference)."""
    name = "maps" if at_input_resolution else "raw"
    torch._check(
        mode in ("value", "percentile"),
        lambda: f"{op}: mode must be 'value' or 'percentile', got '{mode}'",
    )
    torch._check(
        mask in ("binary", "soft"), lambda: f"{op}: mask must be 'binary' or 'soft', got '{mask}'"
    )
    torch._check(
        images.dim() == 4, lambda: f"{op}: images must be (N, C, H, W), got {images.dim()} dims"
    )
    torch._check(maps.dim() == 3, lambda: f"{op}: {name} must be 3-D, got {maps.dim()} dims")
    torch._check(
        thresholds.dim() == 1,
        lambda: f"{op}: thresholds must be 1-D (T,), got {thresholds.dim()} dims",
    )
    torch._check(
        thresholds.dtype.is_floating_point,
        lambda: f"{op}: thresholds must be floating point, got {thresholds.dtype}",
    )
    if kernel:
        torch._check(
            maps.dtype == images.dtype,
            lambda: (
                f"{op}: {name} and images must have the same dtype, got {maps.dtype} "
                f"and {images.dtype}"
            ),
        )
        torch._check(
            maps.device == images.device and thresholds.device == images.device,
            lambda: f"{op}: {name}, images and thresholds must be on one device",
        )
    torch._check(
        maps.shape[0] == images.shape[0],
        lambda: (
            f"{op}: {name} and images must have the same batch size, got {maps.shape[0]} "
            f"and {images.shape[0]}"
        ),
    )
    height, width = images.shape[2], images.shape[3]
    torch._check(
        height > 0 and width > 0,
        lambda: f"{op}: images must have a non-empty (H, W), got ({height}, {width})",
    )
    if at_input_resolution:
        torch._check(
            maps.shape[1] == height and maps.shape[2] == width,
            lambda: f"{op}: maps must be (N, H, W) like images, got {tuple(maps.shape)}",
        )
    else:
        torch._check(
            maps.shape[1] > 0 and maps.shape[2] > 0,
            lambda: f"{op}: raw maps must be non-empty, got (h, w) = {tuple(maps.shape[1:])}",
        )


def check_ladder_out(op: str, out: Tensor, images: Tensor, thresholds: Tensor) -> None:
    """``out`` must be exactly the contiguous ``(N * T, C, H, W)`` batch in the images' dtype."""
    n, channels, height, width = images.shape
    expected = (n * thresholds.shape[0], channels, height, width)
    torch._check(
        tuple(out.shape) == expected,
        lambda: f"{op}: out must be (N * T, C, H, W) = {expected}, got {tuple(out.shape)}",
    )
    torch._check(
        out.dtype == images.dtype and out.device == images.device,
        lambda: f"{op}: out must have the dtype and device of images",
    )
    torch._check(out.is_contiguous(), lambda: f"{op}: out must be contiguous")


def check_select_inputs(op: str, logits: Tensor, classes: Tensor, original: Tensor) -> int:
    """The C++ kernels' argument checks of ``rpi_select``; returns ``T``."""
    torch._check(
        logits.dim() == 2, lambda: f"{op}: logits must be (N * T, K), got {logits.dim()} dims"
    )
    torch._check(
        classes.dim() == 1, lambda: f"{op}: classes must be (N,), got {classes.dim()} dims"
    )
    torch._check(
        classes.dtype == torch.int64,
        lambda: f"{op}: classes must be int64 (long), got {classes.dtype}",
    )
    torch._check(
        tuple(original.shape) == tuple(classes.shape),
        lambda: f"{op}: original must be (N,) like classes, got {tuple(original.shape)}",
    )
    torch._check(
        original.dtype == logits.dtype,
        lambda: f"{op}: original must have the dtype of logits ({logits.dtype})",
    )
    n, rows = classes.shape[0], logits.shape[0]
    if n == 0:
        torch._check(rows == 0, lambda: f"{op}: logits must have N * T rows for N = 0")
        return 0
    torch._check(
        rows % n == 0, lambda: f"{op}: logits must have N * T rows for N = {n}, got {rows}"
    )
    return rows // n


def check_classes_in_range(op: str, classes: Tensor, num_classes: int) -> None:
    """Every class in ``[0, num_classes)``, with the C++ CPU kernel's message; reads the values
    (one device sync), so front doors call it in eager mode only."""
    bad = (classes < 0) | (classes >= num_classes)
    if classes.numel() and bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise RuntimeError(
            f"{op}: classes[{first}] = {int(classes[first])} is out of range for "
            f"{num_classes} classes"
        )


def tft_ladder_fake(
    raw: Tensor, images: Tensor, thresholds: Tensor, threshold_mode: str, mask_kind: str
) -> tuple[Tensor, Tensor]:
    """Fake kernel of ``tft_ladder`` (C++ and Triton): the batch and the map, shapes only."""
    check_ladder_inputs(
        "tft_ladder", raw, images, thresholds, threshold_mode, mask_kind, at_input_resolution=False
    )
    n, channels, height, width = images.shape
    masked = images.new_empty((n * thresholds.shape[0], channels, height, width))
    return masked, images.new_empty((n, height, width))


def tft_ladder_out_fake(
    raw: Tensor,
    images: Tensor,
    thresholds: Tensor,
    threshold_mode: str,
    mask_kind: str,
    out: Tensor,
) -> Tensor:
    """Fake kernel of ``tft_ladder_out`` (C++ and Triton): the map's shape."""
    check_ladder_inputs(
        "tft_ladder_out",
        raw,
        images,
        thresholds,
        threshold_mode,
        mask_kind,
        at_input_resolution=False,
    )
    check_ladder_out("tft_ladder_out", out, images, thresholds)
    n, _, height, width = images.shape
    return images.new_empty((n, height, width))


def tft_mask_fake(
    maps: Tensor, images: Tensor, thresholds: Tensor, threshold_mode: str, mask_kind: str
) -> Tensor:
    """Fake kernel of ``tft_mask`` (C++ and Triton): the batch's shape."""
    check_ladder_inputs(
        "tft_mask", maps, images, thresholds, threshold_mode, mask_kind, at_input_resolution=True
    )
    n, channels, height, width = images.shape
    return images.new_empty((n * thresholds.shape[0], channels, height, width))


def rpi_select_fake(
    logits: Tensor, classes: Tensor, original: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Fake kernel of ``rpi_select`` (C++ and Triton): RPI ``(N, T)``, index ``(N,)`` and
    probability ``(N, T)``."""
    t = check_select_inputs("rpi_select", logits, classes, original)
    n = classes.shape[0]
    return logits.new_empty((n, t)), classes.new_empty((n,)), logits.new_empty((n, t))
