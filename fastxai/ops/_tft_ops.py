"""Front doors of the TFT ops.

* :func:`tft_ladder`: raw CAM -> the masked batch of a threshold ladder, and the upsampled map;
* :func:`tft_mask`: the same batch from maps already at input resolution (TFT on any maps);
* :func:`rpi_select`: the ladder's logits -> the RPI curve and the selected threshold.

Backends: :func:`fastxai.ops._dispatch.choose_backend` (these kernels have no backward: inputs
that require grad run the differentiable reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

import fastxai.ops.reference as reference
from fastxai.ops._dispatch import Backend, choose_backend, kernel
from fastxai.ops._tft_checks import (
    check_classes_in_range,
    check_ladder_inputs,
    check_ladder_out,
    check_select_inputs,
)

Mode = Literal["value", "percentile"]
MaskKind = Literal["binary", "soft"]


def _as_thresholds(thresholds: Tensor | Sequence[float], images: Tensor) -> Tensor:
    if isinstance(thresholds, Tensor):
        if not thresholds.dtype.is_floating_point:
            thresholds = thresholds.double()
        # The C++ CPU kernel's value mode reads thresholds already in the maps' dtype as if
        # they were contiguous.
        return thresholds.to(images.device).contiguous()
    return torch.tensor(thresholds, dtype=torch.float64, device=images.device)


def _check_options(mode: str, mask: str) -> None:
    if mode not in ("value", "percentile"):
        raise ValueError(f"mode must be 'value' or 'percentile', got {mode!r}")
    if mask not in ("binary", "soft"):
        raise ValueError(f"mask must be 'binary' or 'soft', got {mask!r}")


def tft_ladder(
    raw: Tensor,
    images: Tensor,
    thresholds: Tensor | Sequence[float],
    *,
    mode: Mode = "value",
    mask: MaskKind = "binary",
    out: Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    r"""The masked batch of TFT's threshold ladder from a raw CAM, in one fused pass.

    :math:`I_n = \mathrm{mm}(\mathrm{up}(\mathrm{mm}(\mathrm{ReLU}(\mathrm{raw}_n))))` at the
    images' resolution (:func:`fastxai.ops.scale_maps`), then row ``n * T + t`` of the batch is
    :math:`w_{n,t} \odot x_n` with

    * ``mode="value"``: keep :math:`M = [I \ge \tau_t] \wedge [I > 0]`;
    * ``mode="percentile"``: mute exactly :math:`\lfloor q_t H W \rfloor` lowest pixels, ties
      muted in row-major order (stable sort);
    * ``mask="binary"``: :math:`w = M`; ``mask="soft"``: :math:`w = M \odot I`.

    Args:
        raw: ``(N, h, w)`` CAM before ReLU and scaling.
        images: ``(N, C, H, W)`` normalised images.
        thresholds: ``(T,)`` values :math:`\tau` or muted fractions :math:`q`.
        out: a preallocated contiguous ``(N * T, C, H, W)`` buffer to write into (reused across
            calls it saves the allocation and page faults of a fresh batch).

    Returns:
        ``(masked, map)``: the ``(N * T, C, H, W)`` batch (``out`` when given) and the
        ``(N, H, W)`` map :math:`I`.

    The percentile mode finds each image's pivot pixel (the one of stable rank
    :math:`\lfloor q H W \rfloor`) with ``std::nth_element`` on the CPU and with ``torch.sort``
    between two kernel launches on CUDA and Triton.
    """
    _check_options(mode, mask)
    thresholds = _as_thresholds(thresholds, images)
    chosen = choose_backend("tft_ladder", (raw, images), backend)
    if chosen != "torch":
        if out is None:
            return kernel("tft_ladder", chosen)(raw, images, thresholds, mode, mask)
        return out, kernel("tft_ladder_out", chosen)(raw, images, thresholds, mode, mask, out)
    eager = not torch.compiler.is_compiling()  # the checks' messages name tensors: eager only
    if eager:
        check_ladder_inputs(
            "tft_ladder",
            raw,
            images,
            thresholds,
            mode,
            mask,
            at_input_resolution=False,
            kernel=False,
        )
    masked, maps = reference.tft_ladder(raw, images, thresholds, mode, mask)
    if out is None:
        return masked, maps
    if eager:
        check_ladder_out("tft_ladder", out, images, thresholds)
    out.copy_(masked)
    return out, maps


def tft_mask(
    maps: Tensor,
    images: Tensor,
    thresholds: Tensor | Sequence[float],
    *,
    mode: Mode = "value",
    mask: MaskKind = "binary",
    backend: Backend = "auto",
) -> Tensor:
    r"""The masked batch of TFT's threshold ladder from maps already at input resolution.

    As :func:`tft_ladder` with :math:`I` = ``maps`` ``(N, H, W)`` (from any method or library):
    returns the ``(N * T, C, H, W)`` batch, row ``n * T + t`` = :math:`w_{n,t} \odot x_n`. The
    value mode compares in the maps' dtype; maps and images of different dtypes run the
    reference, whose weights take the images' dtype.
    """
    _check_options(mode, mask)
    thresholds = _as_thresholds(thresholds, images)
    chosen = choose_backend("tft_mask", (maps, images), backend)
    if chosen != "torch":
        return kernel("tft_mask", chosen)(maps, images, thresholds, mode, mask)
    if not torch.compiler.is_compiling():
        check_ladder_inputs(
            "tft_mask", maps, images, thresholds, mode, mask, at_input_resolution=True, kernel=False
        )
    return reference.tft_mask(maps, images, thresholds, mode, mask)


def rpi_select(
    logits: Tensor, classes: Tensor, original: Tensor, *, backend: Backend = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    r"""TFT's epilogue: the RPI curve of every image and its selected threshold.

    ``logits`` ``(N * T, K)`` of the masked batch (row ``n * T + t``), ``classes`` ``(N,)``
    int64, ``original`` ``(N,)`` the probability :math:`p^0_n` of class :math:`c_n` on the
    unmasked image. With :math:`p_{n,t} = \mathrm{softmax}(\ell_{n,t})_{c_n}`:

    .. math:: \mathrm{RPI}_{n,t} = \max(p_{n,t} - p^0_n, 0) / p^0_n

    Returns ``(rpi, index, probability)``: ``(N, T)``, the first :math:`\arg\max_t` ``(N,)``
    int64, -1 when no threshold raised the probability (every RPI is 0: no muting), and
    :math:`p_{n,t}` ``(N, T)``. A class outside ``[0, K)`` raises the same RuntimeError on every
    backend (in eager mode). The kernels compute the max-subtracted softmax per row without
    materialising the ``(N * T, K)`` probabilities.
    """
    chosen = choose_backend("rpi_select", (logits, original), backend)
    if not torch.compiler.is_compiling():  # the same error from every backend
        check_select_inputs("rpi_select", logits, classes, original)
        check_classes_in_range("rpi_select", classes, logits.shape[1])
    if chosen != "torch":
        return kernel("rpi_select", chosen)(logits, classes, original)
    return reference.rpi_select(logits, classes, original)
