"""Front doors of the TFT ops, with the fake registrations of their C++ ops.

* :func:`tft_ladder`: raw CAM -> the masked batch of a threshold ladder, and the upsampled map;
* :func:`tft_mask`: the same batch from maps already at input resolution (TFT on any maps);
* :func:`rpi_select`: the ladder's logits -> the RPI curve and the selected threshold.

Backends: ``"auto"`` runs the C++ kernel for CPU tensors when ``fastxai._C`` is loaded, the CUDA
kernel for CUDA tensors when the extension was built with it and Triton otherwise, and the
pure-PyTorch reference for anything else (other or mixed dtypes, other devices, inputs that
require grad: these ops have no backward, the reference is differentiable). ``"cpp"``,
``"triton"`` and ``"torch"`` force one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from fastxai.ops import reference
from fastxai.ops._extension import has_extension
from fastxai.ops._tft_checks import (
    check_ladder_inputs,
    check_ladder_out,
    check_select_inputs,
    tft_ladder_fake,
    tft_ladder_out_fake,
    tft_mask_fake,
)

Backend = Literal["auto", "cpp", "triton", "torch"]
Mode = Literal["value", "percentile"]
MaskKind = Literal["binary", "soft"]

_KERNEL_DTYPES = (torch.float32, torch.float64)
_OPS = ("tft_ladder", "tft_ladder_out", "tft_mask", "rpi_select")


def _has_cpp_op(op: str) -> bool:
    return has_extension() and hasattr(torch.ops.fastxai, op)


def _has_cuda_kernel(op: str) -> bool:
    return _has_cpp_op(op) and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fastxai::{op}", "CUDA"
    )


# Looked up once: torch.compile cannot trace the dispatcher query. (An extension built before
# these ops existed loads without them.)
_CPP_OPS = {op: _has_cpp_op(op) for op in _OPS}
_CUDA_KERNELS = {op: _has_cuda_kernel(op) for op in _OPS}


def _choose_backend(op: str, tensors: Sequence[Tensor], backend: Backend) -> str:
    """``tensors``: the floating-point inputs that must share one kernel dtype and device."""
    if backend in ("torch", "triton"):
        return backend
    if backend == "cpp":
        if not _CPP_OPS[op]:
            raise RuntimeError(f"{op}: backend='cpp' requested but fastxai._C does not have it")
        return "cpp"
    if backend != "auto":
        raise ValueError(
            f"{op}: backend must be 'auto', 'cpp', 'triton' or 'torch', got {backend!r}"
        )
    first = tensors[0]
    if first.dtype not in _KERNEL_DTYPES or any(t.dtype != first.dtype for t in tensors):
        return "torch"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "torch"
    if first.device.type == "cpu":
        return "cpp" if _CPP_OPS[op] else "torch"
    if first.device.type == "cuda":
        return "cpp" if _CUDA_KERNELS[op] else "triton"
    return "torch"


def _as_thresholds(thresholds: Tensor | Sequence[float], images: Tensor) -> Tensor:
    if isinstance(thresholds, Tensor):
        if not thresholds.dtype.is_floating_point:
            thresholds = thresholds.double()
        return thresholds.to(images.device)
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
    chosen = _choose_backend("tft_ladder", (raw, images), backend)
    if chosen == "cpp":
        if out is None:
            return torch.ops.fastxai.tft_ladder(raw, images, thresholds, mode, mask)
        return out, torch.ops.fastxai.tft_ladder_out(raw, images, thresholds, mode, mask, out)
    if chosen == "triton":
        from fastxai.ops.triton.tft_ladder import tft_ladder_out_triton, tft_ladder_triton

        if out is None:
            return tft_ladder_triton(raw, images, thresholds, mode, mask)
        return out, tft_ladder_out_triton(raw, images, thresholds, mode, mask, out)
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
    chosen = _choose_backend("tft_mask", (maps, images), backend)
    if chosen == "cpp":
        return torch.ops.fastxai.tft_mask(maps, images, thresholds, mode, mask)
    if chosen == "triton":
        from fastxai.ops.triton.tft_ladder import tft_mask_triton

        return tft_mask_triton(maps, images, thresholds, mode, mask)
    if not torch.compiler.is_compiling():
        check_ladder_inputs(
            "tft_mask", maps, images, thresholds, mode, mask, at_input_resolution=True, kernel=False
        )
    return reference.tft_mask(maps, images, thresholds, mode, mask)


def rpi_select(
    logits: Tensor, classes: Tensor, original: Tensor, *, backend: Backend = "auto"
) -> tuple[Tensor, Tensor]:
    r"""TFT's epilogue: the RPI curve of every image and its selected threshold.

    ``logits`` ``(N * T, K)`` of the masked batch (row ``n * T + t``), ``classes`` ``(N,)``
    int64, ``original`` ``(N,)`` the probability :math:`p^0_n` of class :math:`c_n` on the
    unmasked image. With :math:`p_{n,t} = \mathrm{softmax}(\ell_{n,t})_{c_n}`:

    .. math:: \mathrm{RPI}_{n,t} = \max(p_{n,t} - p^0_n, 0) / p^0_n

    Returns ``(rpi, index)``: ``(N, T)`` and the first :math:`\arg\max_t` ``(N,)`` int64, -1
    when no threshold raised the probability (every RPI is 0: no muting, SPEC A.2). The kernels
    compute the max-subtracted softmax per row without materialising the probabilities.
    """
    chosen = _choose_backend("rpi_select", (logits, original), backend)
    if chosen == "cpp":
        return torch.ops.fastxai.rpi_select(logits, classes, original)
    if chosen == "triton":
        from fastxai.ops.triton.rpi_select import rpi_select_triton

        return rpi_select_triton(logits, classes, original)
    if not torch.compiler.is_compiling():
        check_select_inputs("rpi_select", logits, classes, original)
    return reference.rpi_select(logits, classes, original)


def _register_cpp_fakes() -> None:
    """Fake kernels of the C++ ops (which ``fastxai._C`` declares); they have no backward."""
    torch.library.register_fake("fastxai::tft_ladder")(tft_ladder_fake)
    torch.library.register_fake("fastxai::tft_ladder_out")(tft_ladder_out_fake)
    torch.library.register_fake("fastxai::tft_mask")(tft_mask_fake)

    @torch.library.register_fake("fastxai::rpi_select")
    def _rpi_select_fake(
        logits: Tensor, classes: Tensor, original: Tensor
    ) -> tuple[Tensor, Tensor]:
        t = check_select_inputs("rpi_select", logits, classes, original)
        n = classes.shape[0]
        return logits.new_empty((n, t)), classes.new_empty((n,))


if all(_CPP_OPS.values()):
    _register_cpp_fakes()
