"""The pipeline every CAM method shares: capture -> per-channel contributions -> map -> scale.

A method only says how it weighs the layer's channels: a function from the captured layer to
``contributions`` of shape ``(N, C, h, w)`` whose channel sum is the raw map (or whose first
principal component is, with ``eigen_smooth``). A method with a fused kernel for that sum may also
give ``raw_map``, used instead of the channel sum.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fastxai import ops
from fastxai._checks import check_images, check_model, warn_user
from fastxai._modes import buffers_kept, buffers_restored_on_error
from fastxai.capture import LayerCapture, ReshapeTransform, capture_layers, resolve_layer
from fastxai.explanation import Explanation
from fastxai.methods._projection import SvdSign, check_svd_sign, first_component_projection

Layer = str | nn.Module
Fusion = Literal["mean", "tanh"]
# (capture, model, x, **options) -> (contributions (N, C, h, w), channel weights (N, C) or None)
ContributionFn = Callable[..., tuple[Tensor, Tensor | None]]
# (capture, model, x, **options) -> raw map (N, h, w): the channel sum of the contributions, fused
RawMapFn = Callable[..., Tensor]


def normalise_layers(model: nn.Module, layer: Layer | Sequence[Layer]) -> list[str]:
    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not layers:
        raise ValueError("layer: expected a module, a dotted name, or a non-empty list of them")
    return [resolve_layer(model, item) for item in layers]


def fuse_layer_maps(raws: Sequence[Tensor], size: tuple[int, int], fusion: Fusion) -> Tensor:
    r"""Input-resolution maps in [0, 1] from one raw map per layer.

    ``"mean"`` (pytorch-grad-cam): :math:`\mathrm{mm}(\tfrac1L \sum_l \mathrm{up}(\mathrm{mm}(
    \mathrm{relu}(r_l))))`. ``"tanh"`` (Layer-CAM paper, Eq. 9): each layer's normalised map
    :math:`M_l` becomes :math:`\tanh(2 M_l / \max M_l)`, the layers are fused by the element-wise
    maximum, then min-max scaled. Several layers run the fused op :func:`fastxai.ops.fuse_maps`.
    """
    if len(raws) == 1:
        return ops.scale_maps(raws[0], size)
    return ops.fuse_maps(raws, size, fusion)


def empty_explanation(x: Tensor) -> Explanation:
    _, _, height, width = x.shape
    return Explanation(
        maps=x.new_zeros(
            (0, height, width), dtype=torch.float32 if x.dtype != torch.float64 else x.dtype
        ),
        targets=torch.zeros(0, dtype=torch.long, device=x.device),
        logits=x.new_zeros((0, 0)),
        raw=x.new_zeros((0, 0, 0)),
    )


def map_dtype(t: Tensor) -> torch.dtype:
    """Maps are computed in float32 (float64 when the model runs in float64)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def in_map_precision(cap: LayerCapture) -> LayerCapture:
    """The capture with activation, gradient and logits upcast to float32 when the model ran in
    float16/bfloat16 (under ``torch.autocast`` or a half model): the method's weights and maps
    are always computed in float32. ``raw_activation`` keeps the model's dtype, since the
    re-runs of the network after the layer (Ablation-CAM) consume it."""
    if cap.activation.dtype not in (torch.float16, torch.bfloat16):
        return cap
    gradient = None if cap.gradient is None else cap.gradient.float()
    return dataclasses.replace(
        cap, activation=cap.activation.float(), gradient=gradient, logits=cap.logits.float()
    )


def explain_layers(
    model: nn.Module,
    x: Tensor,
    layer: Layer | Sequence[Layer],
    targets: Any,
    contributions: ContributionFn,
    *,
    method: str,
    with_gradient: bool,
    reshape_transform: ReshapeTransform | None = None,
    fusion: Fusion = "mean",
    eigen_smooth: bool = False,
    svd_sign: SvdSign = "largest_positive",
    tft: bool = False,
    tft_options: dict[str, Any] | None = None,
    raw_map: RawMapFn | None = None,
    logits_graph: bool = False,
    create_graph: bool = False,
    reruns_suffix: bool = False,
) -> Explanation:
    """Run a CAM method given by its ``contributions`` function; see :mod:`fastxai.methods`.

    ``raw_map``, when given, computes the raw map directly (without ``eigen_smooth``).
    ``logits_graph`` and ``create_graph`` (with grad enabled): the first layer's capture is the
    model's own forward (see :func:`fastxai.capture.capture_layer`). ``reruns_suffix``: the
    method re-runs the network after each layer, so every layer is captured through its own split
    (one pass per layer instead of one for all).
    """
    in_graph = (logits_graph or create_graph) and torch.is_grad_enabled()
    check_model(model, forward_of_loss=in_graph)
    layers = normalise_layers(model, layer)
    check_images(model, x)
    if fusion not in ("mean", "tanh"):
        raise ValueError(f"fusion must be 'mean' or 'tanh', got {fusion!r}")
    check_svd_sign(svd_sign)
    if create_graph and (tft or eigen_smooth):
        option = "tft" if tft else "eigen_smooth"
        raise ValueError(
            f"create_graph=True: {option}=True is not differentiable (thresholds or a principal "
            f"component's sign); pass {option}=False for differentiable maps"
        )
    if x.shape[0] == 0:
        return empty_explanation(x)
    capture = functools.partial(
        capture_layers,
        model,
        x,
        targets=targets,
        with_gradient=with_gradient,
        reshape_transform=reshape_transform,
        logits_graph=in_graph,
        create_graph=create_graph and in_graph,
        own_splits=reruns_suffix,
    )
    with ExitStack() as buffers:
        if in_graph:
            # The first capture is the model's forward: in training mode BatchNorm's running
            # statistics update once, as in model(x) (undone if the call raises). Every later
            # forward (other layers, Score-CAM, Ablation-CAM, TFT) changes no buffer.
            buffers.enter_context(buffers_restored_on_error(model))
            captures = capture(layers[:1])
            buffers.enter_context(buffers_kept(model))
            captures += capture(layers[1:])
        else:
            buffers.enter_context(buffers_kept(model))
            captures = capture(layers)
        return _explanation_from_captures(
            model,
            x,
            layers,
            captures,
            contributions,
            method=method,
            fusion=fusion,
            eigen_smooth=eigen_smooth,
            svd_sign=svd_sign,
            tft=tft,
            tft_options=tft_options,
            raw_map=raw_map,
        )


def _explanation_from_captures(
    model: nn.Module,
    x: Tensor,
    layers: list[str],
    captures: list[LayerCapture],
    contributions: ContributionFn,
    *,
    method: str,
    fusion: Fusion,
    eigen_smooth: bool,
    svd_sign: SvdSign,
    tft: bool,
    tft_options: dict[str, Any] | None,
    raw_map: RawMapFn | None,
) -> Explanation:
    captures = [in_map_precision(cap) for cap in captures]
    raws: list[Tensor] = []
    weights: list[Tensor | None] = []
    for cap in captures:
        if raw_map is not None and not eigen_smooth:
            raw, channel_weights = raw_map(cap, model, x), None
        else:
            contrib, channel_weights = contributions(cap, model, x)
            contrib = contrib.to(map_dtype(contrib))
            raw = first_component_projection(contrib, svd_sign) if eigen_smooth else contrib.sum(1)
        raws.append(raw)
        weights.append(channel_weights)
    if not torch.compiler.is_compiling():
        for name, raw in zip(layers, raws, strict=True):
            if raw.shape[-2:] == (1, 1):
                warn_user(
                    f"layer {name!r} gives a 1 x 1 map for {x.shape[2]} x {x.shape[3]} inputs, "
                    "so every map is constant (all zero after normalisation); choose an "
                    "earlier layer or larger inputs"
                )
    first = captures[0]
    extras: dict[str, Any] = {"method": method, "layers": layers}
    if weights[0] is not None:
        extras["weights"] = weights[0] if len(weights) == 1 else weights
    if len(raws) > 1:
        extras["raw_per_layer"] = raws
    # TFT reads the logits' values only; the returned logits keep their graph.
    classes, logits = first.targets.classes, first.logits
    if tft and len(raws) == 1:
        # The fused path: one op scales the raw map and writes the masked ladder batch.
        from fastxai.thresholding import tft_from_raw

        tuned = tft_from_raw(model, x, raws[0], classes, logits.detach(), **(tft_options or {}))
        tuned.extras = {**extras, **tuned.extras}
        tuned.logits = logits
        return tuned
    maps = fuse_layer_maps(raws, (x.shape[2], x.shape[3]), fusion)
    explanation = Explanation(maps=maps, targets=classes, logits=logits, raw=raws[0], extras=extras)
    if tft:
        from fastxai.thresholding import tft_from_explanation

        explanation.logits = logits.detach()
        explanation = tft_from_explanation(model, x, explanation, **(tft_options or {}))
        explanation.logits = logits
    return explanation


_SHARED_ARGS = """
    Args:
        model: the classifier, explained in its current mode and never modified (in training
            mode BatchNorm uses the batch's statistics and its running statistics stay as
            they are).
        x: ``(N, C, H, W)`` normalised images on the model's device.
        layer: a submodule or its dotted name (``"layer4"``, ``"layer3.1.conv2"``,
            ``"_swish@1"`` for the second call of a module used twice), or a list of them.
        targets: ``None`` (top-1 per image), an int, one int per image, or callables mapping an
            image's 1-D output to a scalar (pytorch-grad-cam targets work).
        tft: apply threshold fine-tuning to the maps (:func:`fastxai.tft`).
        reshape_transform: turns the layer output into ``(N, C, h, w)`` (e.g. ViT tokens).
        fusion: how several layers combine: ``"mean"`` (pytorch-grad-cam) or ``"tanh"``.
        eigen_smooth: replace the channel sum by the first principal component.
        svd_sign: how a principal component's arbitrary sign is fixed (``eigen_smooth`` and the
            Eigen methods): ``"largest_positive"`` (the largest-magnitude value of the
            projection positive) or ``"numpy"`` (the sign of ``numpy.linalg.svd`` in float32,
            which gives pytorch-grad-cam's maps).
        tft_options: keyword arguments for :func:`fastxai.tft` when ``tft=True``.
        logits_graph: with grad enabled, the call is the model's forward for a loss: the
            logits keep their autograd graph to the parameters, and in training mode
            BatchNorm's running statistics update once, as in ``model(x)``.
        create_graph: with grad enabled, also the maps and ``raw``: the gradient at the layer is
            taken with its own graph, so a loss on the maps back-propagates to the parameters
            (double backward). Not for Eigen-CAM, Score-CAM, Ablation-CAM, ``tft`` or
            ``eigen_smooth``. Under ``torch.no_grad`` both options record nothing.
        **method_options: options of this method (documented above), if any.

    Returns:
        An :class:`~fastxai.Explanation`: ``maps`` ``(N, H, W)`` in [0, 1], ``raw`` ``(N, h, w)``,
        ``targets``, ``logits``; ``extras["weights"]`` holds the channel weights ``(N, C)`` where
        the method has them.

    Production use: the call compiles with ``torch.compile(fullgraph=True)`` once the model was
    split at the layer by an eager call or :func:`fastxai.capture.prepare` (value checks are
    then skipped, see :mod:`fastxai._checks`; Score-CAM and Ablation-CAM unroll their chunk
    loops, so compile them only for small layers). Under ``torch.autocast`` the model passes run
    in reduced precision and the weights and maps in float32.
"""


DIFFERENTIABLE_METHODS: set[str] = set()  # the methods whose maps support create_graph=True


def check_create_graph(method: str, create_graph: bool) -> None:
    """One-line error for ``create_graph=True`` on a method whose maps are not differentiable."""
    if create_graph and method not in DIFFERENTIABLE_METHODS:
        raise ValueError(
            f"create_graph=True: {method}'s maps are not differentiable in the model's "
            f"parameters; use one of {sorted(DIFFERENTIABLE_METHODS)}"
        )


def make_cam_method(
    name: str,
    contributions: ContributionFn,
    *,
    with_gradient: bool,
    summary: str,
    raw_map: RawMapFn | None = None,
    differentiable: bool = True,
    reads_reshape_transform: bool = False,
    reads_svd_sign: bool = False,
    reruns_suffix: bool = False,
) -> Callable[..., Explanation]:
    """Build the public function of a CAM method from its ``contributions`` rule.

    Options beyond the shared signature are passed to ``contributions`` (and ``raw_map``, the
    fused channel sum, when the method has one) as keyword arguments; with
    ``reads_reshape_transform`` so is ``reshape_transform`` (for a method that maps its own
    derivatives of the raw layer output onto the reshaped grid), and with ``reads_svd_sign``
    ``svd_sign`` (for a method whose map is a principal component). ``differentiable``: the
    contributions are differentiable in the captured activation and gradient
    (``create_graph=True`` is supported). ``reruns_suffix``: the rule runs the network after the
    layer (``cap.split``), see :func:`explain_layers`.
    """
    if differentiable:
        DIFFERENTIABLE_METHODS.add(name)

    def explain(
        model: nn.Module,
        x: Tensor,
        layer: Layer | Sequence[Layer],
        targets: Any = None,
        *,
        tft: bool = False,
        reshape_transform: ReshapeTransform | None = None,
        fusion: Fusion = "mean",
        eigen_smooth: bool = False,
        svd_sign: SvdSign = "largest_positive",
        tft_options: dict[str, Any] | None = None,
        logits_graph: bool = False,
        create_graph: bool = False,
        **method_options: Any,
    ) -> Explanation:
        check_create_graph(name, create_graph)
        options = dict(method_options)
        if reads_reshape_transform:
            options["reshape_transform"] = reshape_transform
        if reads_svd_sign:
            options["svd_sign"] = svd_sign

        def bound(cap: LayerCapture, m: nn.Module, images: Tensor) -> tuple[Tensor, Tensor | None]:
            return contributions(cap, m, images, **options)

        return explain_layers(
            model,
            x,
            layer,
            targets,
            bound,
            method=name,
            with_gradient=with_gradient,
            reshape_transform=reshape_transform,
            fusion=fusion,
            eigen_smooth=eigen_smooth,
            svd_sign=svd_sign,
            tft=tft,
            tft_options=tft_options,
            raw_map=None if raw_map is None else functools.partial(raw_map, **method_options),
            logits_graph=logits_graph,
            create_graph=create_graph,
            reruns_suffix=reruns_suffix,
        )

    explain.__name__ = explain.__qualname__ = name
    explain.__doc__ = summary.rstrip() + "\n" + _SHARED_ARGS
    return explain
