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

from fastxai.ops import has_extension, reference

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
