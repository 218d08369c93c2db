"""Threshold fine-tuning (TFT) of saliency maps (Han, Lee and Lee, Applied Sciences 2022).

For each image, every candidate threshold :math:`\\tau` of a ladder mutes the map below it; all
masked images of all images go through the model as one batch (chunked under a memory bound), and
the threshold with the largest relative probability increase

.. math:: \\mathrm{RPI}(\\tau) = \\max(\\hat y_c(M_\\tau \\odot x) - y_c(x), 0) / y_c(x)

wins (first maximum on ties). When no threshold raises the probability, nothing is muted: the
mask is :math:`1[I > 0]` and :math:`\\tau^* = 0` (Alg. 1 of the paper).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from fastxai import ops
from fastxai._batching import batched_logits, no_autograd
from fastxai._checks import check_images, check_maps, check_model
from fastxai._modes import keeps_buffers
from fastxai.explanation import Explanation
from fastxai.ops.reference import stable_rank

Mode = Literal["value", "percentile"]
MaskKind = Literal["binary", "soft"]

PAPER_THRESHOLDS = tuple(i / 10 for i in range(10))  # 0.0 .. 0.9 (tau = 0 included)
PERCENTILE_THRESHOLDS = tuple(i / 10 for i in range(1, 10))  # mute 10% .. 90% (official code)

# Table 1 of the paper: the share of each method's map muted by default ("naive" thresholds).
NAIVE_MUTED_FRACTION = {
    "gradcam": 0.85,
    "gradcampp": 0.50,
    "ablationcam": 0.80,
    "layercam": 0.85,
    "scorecam": 0.50,
    "cam": 0.85,
    "xgradcam": 0.85,
}


def naive_threshold(method: str) -> float:
    """The paper's Table 1 default muting for ``method`` (fraction of pixels muted).

    CAM and XGrad-CAM have no Table 1 entry; they take Grad-CAM's
    85%.
    """
    try:
        return NAIVE_MUTED_FRACTION[method]
    except KeyError:
        raise ValueError(
            f"method: no naive threshold for {method!r}; known: {sorted(NAIVE_MUTED_FRACTION)}"
        ) from None


def percentile_masks(maps: Tensor, fractions: Tensor) -> Tensor:
    """Masks muting exactly ``floor(q * H * W)`` lowest pixels per map and fraction ``q``.

    Ties are broken by a stable sort (the earlier pixel in row-major order is muted first).
    ``maps`` ``(N, H, W)``, ``fractions`` ``(T,)`` -> ``(N, T, H, W)`` bool.
    """
    n, h, w = maps.shape
    muted = torch.floor(fractions.double() * (h * w)).long()
    return (stable_rank(maps)[:, None, :] >= muted[None, :, None]).view(n, len(fractions), h, w)


def ladder_masks(maps: Tensor, thresholds: Tensor, mode: Mode) -> Tensor:
    """Binary masks ``(N, T, H, W)``: value mode keeps :math:`I \\ge \\tau` and :math:`I > 0`."""
    if mode == "value":
        return (maps[:, None] >= thresholds[None, :, None, None]) & (maps[:, None] > 0)
    if mode == "percentile":
        return percentile_masks(maps, thresholds)
    raise ValueError(f"mode must be 'value' or 'percentile', got {mode!r}")


def selected_masks(maps: Tensor, thresholds: Tensor, selected: Tensor, mode: Mode) -> Tensor:
    """The binary mask ``(N, H, W)`` of threshold ``thresholds[selected[n]]`` for each map ``n``.

    The same masks as :func:`ladder_masks` (value mode compares in the maps' dtype), one per map.
    """
    chosen = thresholds[selected]
    if mode == "value":
        tau = chosen.to(maps.dtype)[:, None, None]
        return (maps >= tau) & (maps > 0)
    n, h, w = maps.shape
    muted = torch.floor(chosen.double() * (h * w)).long()
    return (stable_rank(maps) >= muted[:, None]).view(n, h, w)


def _ladder(thresholds: Sequence[float] | Tensor | None, mode: Mode, compiling: bool) -> Tensor:
    """The threshold ladder as a float64 tensor, checked to be a non-empty 1-D list in [0, 1].

    A Python sequence is checked before it becomes a tensor, so the check also holds under
    ``torch.compile``; a tensor's values are checked in eager mode only.
    """
    if thresholds is None:
        thresholds = PAPER_THRESHOLDS if mode == "value" else PERCENTILE_THRESHOLDS
    if not isinstance(thresholds, Tensor) and hasattr(thresholds, "__array__"):
        thresholds = torch.as_tensor(thresholds)  # a numpy array
    if isinstance(thresholds, Tensor):
        if thresholds.dim() != 1 or thresholds.numel() == 0:
            raise ValueError("thresholds must be a non-empty 1-D sequence")
        if thresholds.dtype == torch.bool or thresholds.dtype.is_complex:
            raise TypeError(f"thresholds must be real numbers, got {thresholds.dtype}")
        ladder = thresholds.to(torch.float64)
        if not compiling and not bool(((ladder >= 0) & (ladder <= 1)).all()):
            raise ValueError("thresholds must lie in [0, 1]")
        return ladder
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence):
        raise TypeError(
            f"thresholds must be a sequence of floats or a 1-D tensor, got {type(thresholds)}"
        )
    values = list(thresholds)
    if not values or any(isinstance(v, (Sequence, Tensor)) for v in values):
        raise ValueError("thresholds must be a non-empty 1-D sequence")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"thresholds must be real numbers, got {type(v).__name__}")
        if not 0 <= v <= 1:  # also rejects NaN
            raise ValueError(f"thresholds must lie in [0, 1], got {v}")
    return torch.tensor(values, dtype=torch.float64)


def _check_options(mode: str, mask: str) -> None:
    if mask not in ("binary", "soft"):
        raise ValueError(f"mask must be 'binary' or 'soft', got {mask!r}")
    if mode not in ("value", "percentile"):
        raise ValueError(f"mode must be 'value' or 'percentile', got {mode!r}")


@keeps_buffers
def tft(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    targets: Tensor | Sequence[int] | int | None = None,
    *,
    thresholds: Sequence[float] | Tensor | None = None,
    mode: Mode = "value",
    mask: MaskKind = "binary",
    logits: Tensor | None = None,
    batch_size: int | None = None,
) -> Explanation:
    """Threshold fine-tuning of ``maps`` (from any method or library) for ``model`` on ``x``.

    Args:
        model: the classifier (its mode is kept; it is never modified).
        x: ``(N, C, H, W)`` normalised images; muted pixels become 0 (the dataset mean).
        maps: ``(N, H, W)`` saliency in [0, 1] at input resolution.
        targets: the class explained per image (``None``: top-1 of ``model(x)``).
        thresholds: the ladder; default 0.0..0.9 in value mode (the paper) and 0.1..0.9 muted
            fractions in percentile mode (the official code).
        mode: ``"value"`` mutes :math:`I < \\tau`; ``"percentile"`` mutes the lowest
            :math:`\\lfloor \\tau HW \\rfloor` pixels (stable ties).
        mask: ``"binary"`` multiplies the image by :math:`M_\\tau` (the paper); ``"soft"`` by the
            thresholded map :math:`I \\odot M_\\tau` (the official code).
        logits: ``model(x)`` if already computed.
        batch_size: masked images per forward (default: by memory).

    Returns:
        An Explanation with ``maps`` = :math:`I \\odot M_{\\tau^*}`, ``mask`` = :math:`M_{\\tau^*}`,
        ``tau`` ``(N,)``, ``rpi`` ``(N, T)``, ``targets`` and ``logits``; ``extras["thresholds"]``
        is the ladder, ``extras["original_maps"]`` the input maps and
        ``extras["probabilities"]`` ``(N, T)`` the class probability of every masked image.
    """
    check_model(model)
    check_images(model, x)
    _check_options(mode, mask)
    check_maps(x, maps)
    n = x.shape[0]
    compiling = torch.compiler.is_compiling()
    if not compiling and maps.numel() and not (bool(maps.amin() >= 0) and bool(maps.amax() <= 1)):
        raise ValueError("maps must lie in [0, 1] (normalised saliency)")
    ladder = _ladder(thresholds, mode, compiling).to(x.device)
    if logits is None:
        with no_autograd():
            logits = model(x)
    elif not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected model(x) of shape ({n}, num_classes), got {shape}")
    from fastxai.targets import resolve_targets

    resolved = resolve_targets(targets, logits)
    if resolved.callables is not None:
        raise ValueError("targets: TFT needs class indices (it compares class probabilities)")
    classes = resolved.classes
    if n == 0:
        t = ladder.numel()
        return Explanation(
            maps=maps.clone(),
            targets=classes,
            logits=logits,
            mask=torch.zeros_like(maps, dtype=torch.bool),
            tau=ladder.new_zeros(0),
            rpi=ladder.new_zeros((0, t)),
            extras={"thresholds": ladder},
        )
    # The fused kernels (fastxai.ops; the reference without the extension): the masked batch
    # (N * T, C, H, W), then the RPI curve and the first threshold maximising it (-1: none).
    masked = ops.tft_mask(maps, x, ladder, mode=mode, mask=mask)
    return _select(model, maps, masked, classes, logits, ladder, mode, batch_size)


def _select(
    model: nn.Module,
    maps: Tensor,
    masked: Tensor,
    classes: Tensor,
    logits: Tensor,
    ladder: Tensor,
    mode: Mode,
    batch_size: int | None,
) -> Explanation:
    """TFT's second half: the ladder batch's forward, :func:`fastxai.ops.rpi_select` (softmax,
    RPI, first maximum and the class probabilities in one pass) and the chosen mask."""
    ladder_logits = batched_logits(model, masked, batch_size)
    if ladder_logits.shape[1] != logits.shape[1]:
        raise ValueError(
            f"logits: {logits.shape[1]} classes, but the model returns {ladder_logits.shape[1]}; "
            "pass model(x) or leave logits out"
        )
    original = torch.softmax(logits.float(), dim=1).gather(1, classes[:, None])[:, 0]
    rpi, selected, probs = ops.rpi_select(ladder_logits, classes, original)
    improved = selected >= 0
    best = selected.clamp_min(0)
    # Only the selected threshold's mask is built (N maps, not the ladder's N * T).
    chosen = selected_masks(maps, ladder, best, mode)
    no_muting = maps > 0
    final_mask = torch.where(improved[:, None, None], chosen, no_muting)
    tau = torch.where(improved, ladder[best], torch.zeros_like(ladder[best]))
    return Explanation(
        maps=maps * final_mask,
        targets=classes,
        logits=logits,
        mask=final_mask,
        tau=tau,
        rpi=rpi,
        extras={"thresholds": ladder, "original_maps": maps, "probabilities": probs},
    )


def _check_class_targets(classes: Tensor) -> None:
    # Callable targets report class -1; the check reads values, so it runs in eager mode only
    # (under torch.compile the class-index cotangent path is the only one that traces).
    if not torch.compiler.is_compiling() and bool((classes < 0).any()):
        raise ValueError("targets: TFT needs class indices (it compares class probabilities)")


def tft_from_explanation(
    model: nn.Module, x: Tensor, explanation: Explanation, **options: object
) -> Explanation:
    """TFT on a CAM method's result, keeping its ``raw`` map and extras."""
    _check_class_targets(explanation.targets)
    tuned = tft(
        model, x, explanation.maps, explanation.targets, logits=explanation.logits, **options
    )
    tuned.raw = explanation.raw
    tuned.extras = {**explanation.extras, **tuned.extras}
    return tuned


def tft_from_raw(
    model: nn.Module,
    x: Tensor,
    raw: Tensor,
    classes: Tensor,
    logits: Tensor,
    *,
    thresholds: Sequence[float] | Tensor | None = None,
    mode: Mode = "value",
    mask: MaskKind = "binary",
    batch_size: int | None = None,
) -> Explanation:
    """TFT of a one-layer CAM from its ``raw`` map ``(N, h, w)``, the fused path.

    One op (:func:`fastxai.ops.tft_ladder`) scales the raw map to the input resolution and
    writes the masked ladder batch; the batch's forward and :func:`fastxai.ops.rpi_select`
    follow. The result equals :func:`tft` on ``scale_maps(raw)`` (with ``raw`` kept).
    """
    _check_class_targets(classes)
    _check_options(mode, mask)
    ladder = _ladder(thresholds, mode, torch.compiler.is_compiling()).to(x.device)
    masked, maps = ops.tft_ladder(raw, x, ladder, mode=mode, mask=mask)
    tuned = _select(model, maps, masked, classes, logits, ladder, mode, batch_size)
    tuned.raw = raw
    return tuned
