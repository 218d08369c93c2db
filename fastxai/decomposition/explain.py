"""Public SRD functions: :func:`srd` (class saliency) and :func:`srd_erf` (effective receptive
field of one PFV). Both run one recorded forward pass, then the fast backward of every unit."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from fastxai._checks import check_images
from fastxai._modes import keeps_buffers
from fastxai.decomposition import fast
from fastxai.decomposition.heads import (
    UnitBackward,
    contrastive,
    propagate,
    resnet_head,
    vgg_gradcam_head,
    vgg_pure_head,
)
from fastxai.decomposition.support import architecture, check_eval_mode
from fastxai.decomposition.trace import Trace
from fastxai.decomposition.walk import trace_forward
from fastxai.explanation import Explanation
from fastxai.targets import Targets, resolve_targets

Rule = Literal["contrastive", "identity"]
VGGHead = Literal["gradcam", "pure_srd"]
RULES = ("contrastive", "identity")
VGG_HEADS = ("gradcam", "pure_srd")


def check_model_and_images(model: nn.Module, x: Tensor, function: str, name: str = "x") -> None:
    """Type, eval mode, supported architecture, then ``x`` (shape, dtype, device, finite)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    architecture(model)
    check_eval_mode(model, function)
    check_images(model, x, name)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    if x.shape[1] != first.in_channels:
        raise ValueError(
            f"{name} has {x.shape[1]} channels but the model's first convolution expects "
            f"{first.in_channels}"
        )
    if x.dtype != first.weight.dtype:
        raise TypeError(f"{name} is {x.dtype} but the model's parameters are {first.weight.dtype}")


def record(model: nn.Module, x: Tensor, name: str = "x") -> Trace:
    """:func:`trace_forward` with a clear error for images too small for the network."""
    try:
        return trace_forward(model, x)
    except RuntimeError as exc:
        if "too small" not in str(exc):
            raise
        raise ValueError(
            f"{name} of size {tuple(x.shape[-2:])} is too small for this model: {exc}"
        ) from exc


def initial_relevance(
    trace: Trace, classes: Tensor, rule: Rule, vgg_head: VGGHead, unit_backward: UnitBackward
) -> tuple[Tensor, dict[str, Tensor], str]:
    """Relevance at ``trace.head_slot`` after the rule, the classifier slots' relevance (pure
    VGG head only) and the head's name."""
    head_relevance: dict[str, Tensor] = {}
    if trace.arch == "resnet":
        start, head = resnet_head(trace, classes), "fc"
    elif vgg_head == "gradcam":
        start, head = vgg_gradcam_head(trace, classes), "gradcam"
    else:
        start, head_relevance = vgg_pure_head(trace, classes, unit_backward)
        head = "pure_srd"
    if rule == "contrastive":
        start = contrastive(start)
    return start, head_relevance, head


def decompose(
    model: nn.Module,
    x: Tensor,
    targets: Targets,
    rule: Rule = "contrastive",
    vgg_head: VGGHead = "gradcam",
    unit_backward: UnitBackward = fast.unit_backward,
) -> tuple[Trace, Tensor, dict[str, Tensor], str]:
    """Trace, class indices, every slot's relevance (``"input"`` included) and the head name.

    ``unit_backward`` is the per-unit rule (the fast form by default; tests pass the explicit
    per-tap reference).
    """
    trace = record(model, x)
    resolved = resolve_targets(targets, trace.logits)
    if resolved.callables is not None:
        raise TypeError("targets: srd explains class logits; give class indices, not callables")
    classes = resolved.classes
    start, head_relevance, head = initial_relevance(trace, classes, rule, vgg_head, unit_backward)
    relevance = propagate(trace.units, {trace.head_slot: start}, unit_backward)
    return trace, classes, {**head_relevance, **relevance}, head


def minmax(relevance: Tensor) -> Tensor:
    r"""Per-map :math:`(R - \min R) / (\max R - \min R)`, 0 for a constant map.

    No additive epsilon as in the CAM maps: relevance values are often far below 1e-7.
    """
    flat = relevance.flatten(1)
    low = flat.amin(1, keepdim=True)
    span = flat.amax(1, keepdim=True) - low
    scaled = torch.where(span > 0, (flat - low) / span.where(span > 0, 1), 0)
    return scaled.view_as(relevance)


def _check_option(value: Any, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _empty(x: Tensor) -> Explanation:
    _, _, height, width = x.shape
    return Explanation(
        maps=x.new_zeros((0, height, width)),
        targets=torch.zeros(0, dtype=torch.long, device=x.device),
        logits=x.new_zeros((0, 0)),
        raw=x.new_zeros((0, height, width)),
    )


@keeps_buffers
def srd(
    model: nn.Module,
    x: Tensor,
    targets: Targets = None,
    *,
    rule: Rule = "contrastive",
    vgg_head: VGGHead = "gradcam",
    return_relevance: bool = False,
) -> Explanation:
    r"""Sharing Ratio Decomposition (Han, Kim, Kwak, ICLR 2024): input-resolution relevance.

    Each unit ``[MaxPool] -> Conv -> [BN] -> [+ shortcut] -> ReLU`` passes its output relevance
    back by the sharing ratio of every contribution :math:`c_{p \to q}` (kernel tap or pool
    offset, plus a bias share proportional to its norm) against the pre-activation PFV:

    .. math:: R_{in}(p) = \sum_{q} \frac{\langle c_{p\to q}, \hat v_q\rangle}{\|\hat v_q\|^2}
              R_{out}(q), \qquad \sum_p \mu_{p \to q} = 1 .

    Computed in the fast form: per unit one convolution backward (gradient x input) plus a
    per-tap norm pass for the bias shares (:mod:`fastxai.decomposition.fast`).

    Args:
        model: a torchvision ResNet or VGG in eval mode; never modified.
        x: ``(N, 3, H, W)`` normalised images on the model's device.
        targets: ``None`` (top-1), an int, or one class index per image.
        rule: ``"contrastive"`` (paper default: subtract each image's mean of the initial map)
            or ``"identity"`` (then ``raw`` sums to the logit for ResNet).
        vgg_head: for VGG, ``"gradcam"`` (the paper's setting: the Grad-CAM map of the last
            convolutional unit is the initial relevance) or ``"pure_srd"`` (not the paper's:
            the classifier is decomposed with the same rule). ResNets always start at the fc
            layer (the paper's setting).
        return_relevance: also return the relevance at every unit's output in
            ``extras["relevance"]`` (slot name -> ``(N, h, w)``).

    Returns:
        :class:`~fastxai.Explanation` with ``raw`` the signed relevance ``(N, H, W)`` at input
        resolution, ``maps`` its per-image min-max scaling to [0, 1], ``targets``, ``logits``,
        and ``extras`` ``{"method", "rule", "head", "paper_setting", "head_slot"}``.
    """
    _check_option(rule, RULES, "rule")
    _check_option(vgg_head, VGG_HEADS, "vgg_head")
    check_model_and_images(model, x, "srd")
    if x.shape[0] == 0:
        return _empty(x)
    with torch.no_grad():
        trace, classes, relevance, head = decompose(model, x, targets, rule, vgg_head)
    raw = relevance["input"]
    extras: dict[str, Any] = {
        "method": "srd",
        "rule": rule,
        "head": head,
        "paper_setting": head != "pure_srd",
        "head_slot": trace.head_slot,
    }
    if return_relevance:
        extras["relevance"] = relevance
    return Explanation(
        maps=minmax(raw), targets=classes, logits=trace.logits, raw=raw, extras=extras
    )


def resolve_slot(model: nn.Module, trace: Trace, layer: str | nn.Module) -> str:
    """The slot a ``layer`` names: a unit's ReLU output (``"layer3.1"``, ``"layer3.1.relu@0"``,
    ``"features.29"``) or an alias (``"layer3"``, the conv ``"features.28"``, a module)."""
    if isinstance(layer, nn.Module):
        names = [n for n, m in model.named_modules() if m is layer and n]
        if not names:
            raise ValueError(f"layer: the {type(layer).__name__} is not a submodule of the model")
        layer = names[0]
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module or a dotted name, got {type(layer).__name__}")
    slot = trace.aliases.get(layer, layer)
    if slot not in trace.slot_sizes or slot == "input":
        known = [s for s in trace.slot_sizes if s != "input"]
        stages = [a for a in trace.aliases if "." not in a]
        raise ValueError(
            f"layer {layer!r} is not a post-activation map SRD decomposes; use a unit output "
            f"({', '.join(known[:3])}, ..., {known[-1]}) or one of {', '.join(stages)}"
        )
    return slot


@keeps_buffers
def srd_erf(
    model: nn.Module,
    x: Tensor,
    layer: str | nn.Module,
    position: tuple[int, int],
    *,
    return_relevance: bool = False,
) -> Explanation:
    r"""Effective receptive field of the PFV at ``position`` of ``layer`` (official ``get_ERF``).

    The relevance is one-hot at ``(layer, position)`` and decomposed down to the input with the
    SRD rule; by conservation the input map sums to 1 (where no pre-activation vector is zero).

    Args:
        model: a torchvision ResNet or VGG in eval mode; never modified.
        x: ``(N, 3, H, W)`` normalised images on the model's device.
        layer: a unit's output: ``"layer3.1"``, ``"layer3.1.relu@0"``, ``"layer3"`` (its last
            block), ``"features.29"`` or its conv ``"features.28"``, or the module itself.
        position: ``(row, col)`` on that layer's map, the same for every image.
        return_relevance: also return every unit's relevance in ``extras["relevance"]``.

    Returns:
        :class:`~fastxai.Explanation`: ``raw`` the signed ERF ``(N, H, W)`` (sums to 1),
        ``maps`` its min-max scaling, ``targets`` all ``-1``, ``logits``, and ``extras``
        ``{"method": "srd_erf", "layer", "position"}``.
    """
    check_model_and_images(model, x, "srd_erf")
    if (
        not isinstance(position, (tuple, list))
        or len(position) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in position)
    ):
        raise TypeError(f"position must be a (row, col) pair of ints, got {position!r}")
    with torch.no_grad():
        trace = record(model, x)
        slot = resolve_slot(model, trace, layer)
        height, width = trace.slot_sizes[slot]
        row, col = position
        if not (0 <= row < height and 0 <= col < width):
            raise ValueError(
                f"position {tuple(position)} is outside the {height}x{width} map of {slot!r}"
            )
        start = x.new_zeros(x.shape[0], height, width)
        start[:, row, col] = 1
        relevance = propagate(trace.units, {slot: start}, fast.unit_backward)
    raw = relevance["input"]
    extras: dict[str, Any] = {"method": "srd_erf", "layer": slot, "position": (row, col)}
    if return_relevance:
        extras["relevance"] = relevance
    return Explanation(
        maps=minmax(raw),
        targets=torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device),
        logits=trace.logits,
        raw=raw,
        extras=extras,
    )
