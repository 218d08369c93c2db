"""Activations at a layer and the gradient of the explained score there.

The model is split once at the layer into ``prefix`` (input -> layer output plus every other value
the rest of the network still needs) and ``suffix`` (layer output -> logits) with :mod:`torch.fx`;
the split is cached per (model, layer) and rebuilt when the model's module structure or mode
changes. Gradients come from ``torch.func.vjp(suffix, a)``: no parameter gradients, no ``.grad``
written, no hooks, no change to the user's model. Several layers are captured together from a
chain of pieces cut at every layer (:mod:`fastxai.layer_chain`, cached per (model, layers)): one
forward and one backward for all of them. With ``logits_graph`` (and grad enabled) the forward is
the model's own instead: the logits keep their autograd graph to the parameters, and
``create_graph`` keeps the activation and the gradient in it too (the gradient is differentiable,
for a loss on the maps). Models that :mod:`torch.fx` cannot trace fall back to a forward hook that
lives inside one call and clones what it keeps, one call per layer; it serves only the thread that
registered it (other threads' forwards of the model pass through untouched), and that path does
not compile with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from fastxai._checks import warn_user_once
from fastxai._tracing import ThreadOwnedTracer, release_graph_module
from fastxai.layer_chain import LayerChain, differentiated, run_piece
from fastxai.targets import ResolvedTargets, resolve_targets

ReshapeTransform = Callable[[Tensor], Tensor]


def split_layer_ref(layer: str) -> tuple[str, int]:
    """``"name@k"`` -> ``("name", k)``: the k-th call (0-based) of a module called several times."""
    if "@" in layer:
        name, _, index = layer.rpartition("@")
        if not index.isdigit():
            raise ValueError(f"layer {layer!r}: expected 'name@k' with a call index k >= 0")
        return name, int(index)
    return layer, 0


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> str:
    """Return the dotted name (with an optional ``@k`` call index) of ``layer`` inside ``model``."""
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer and name:
                return name
        raise ValueError(
            f"layer: the module {type(layer).__name__} is not a submodule of the model"
        )
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module or a dotted name, got {type(layer).__name__}")
    name, _ = split_layer_ref(layer)
    names = [n for n, _ in model.named_modules() if n]
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"layer {name!r} is not a submodule of the model{hint}")
    return layer


def _structure_signature(model: nn.Module) -> tuple:
    return tuple((name, id(m), m.training) for name, m in model.named_modules())


class _LeafTracer(ThreadOwnedTracer):
    """Traces through every module except the standard leaves and the explained layer."""

    def __init__(self, leaf_name: str) -> None:
        super().__init__()
        self.leaf_name = leaf_name

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self.leaf_name or super().is_leaf_module(
            m, module_qualified_name
        )


def _is_batch_size_node(node: fx.Node) -> bool:
    """``t.size(0)``: recomputed from the layer output so the suffix runs at any batch size."""
    if node.op != "call_method" or node.target != "size":
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return dim == 0


class LayerSplit:
    """A model cut at one layer: ``prefix(x) -> (a, *carry)`` and ``suffix(a, *carry) -> logits``.

    ``carry`` holds the values computed before the layer that the rest of the network still
    reads (residual inputs, for example); the suffix treats them as constants, so
    ``vjp(suffix)`` gives exactly :math:`\\partial y / \\partial A` of the whole network.
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        name, call_index = split_layer_ref(layer)
        tracer = _LeafTracer(name)
        graph = tracer.trace(model)
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
        if len(calls) <= call_index:
            raise ValueError(
                f"layer {layer!r}: the module is called {len(calls)} time(s) in forward"
            )
        cut = calls[call_index]
        order = {n: i for i, n in enumerate(graph.nodes)}

        downstream: set[fx.Node] = set()
        frontier = [cut]
        while frontier:
            for user in frontier.pop().users:
                if user not in downstream and user.op != "output":
                    downstream.add(user)
                    frontier.append(user)
        output_node = next(n for n in graph.nodes if n.op == "output")
        needed_by_suffix = {
            inp
            for n in [*downstream, output_node]
            for inp in n.all_input_nodes
            if inp not in downstream and inp is not cut
        }
        # Attribute fetches and batch-size queries are recomputed in the suffix, not carried.
        recomputed = {n for n in needed_by_suffix if n.op == "get_attr" or _is_batch_size_node(n)}
        carried = sorted(needed_by_suffix - recomputed, key=order.__getitem__)

        prefix_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in graph.nodes:
            if node in downstream or node.op == "output":
                continue
            env[node] = prefix_graph.node_copy(node, env.__getitem__)
        prefix_graph.output((env[cut], *[env[n] for n in carried]))

        suffix_graph = fx.Graph()
        senv: dict[fx.Node, fx.Node] = {cut: suffix_graph.placeholder("activation")}
        for i, node in enumerate(carried):
            senv[node] = suffix_graph.placeholder(f"carry_{i}")
        for node in sorted(recomputed, key=order.__getitem__):
            if node.op == "get_attr":
                senv[node] = suffix_graph.node_copy(node, senv.__getitem__)
            else:
                senv[node] = suffix_graph.call_method("size", (senv[cut], 0))
        for node in graph.nodes:
            if node in downstream or node.op == "output":
                senv[node] = suffix_graph.node_copy(node, senv.__getitem__)

        root = model
        self.layer = layer
        self.prefix = fx.GraphModule(root, prefix_graph)
        self._suffix = fx.GraphModule(root, suffix_graph)
        self.num_carried = len(carried)

    def suffix(self, activation: Tensor, *carry: Any) -> Tensor:
        """Run the network from the layer on. Inputs are cloned first: torchvision's in-place
        ReLUs and residual adds would otherwise overwrite the caller's activations."""
        cloned = [c.clone() if isinstance(c, Tensor) else c for c in carry]
        return self._suffix(activation.clone(), *cloned)

    def release(self) -> None:
        """Let go of the model's layers and weights (the model died or changed)."""
        release_graph_module(self.prefix)
        release_graph_module(self._suffix)

    def suffix_on_buffer_copies(
        self, activation: Tensor, *carry: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`suffix` reading and updating copies of its buffers, returned with the output.

        A gradient transform refuses in-place updates of tensors from outside it (BatchNorm's
        running statistics in training mode): the caller writes the copies back afterwards.
        Without a module in training mode no buffer changes, and none is copied."""
        if not any(m.training for m in self._suffix.modules()):
            return self.suffix(activation, *carry), {}
        copies = {name: b.clone() for name, b in self._suffix.named_buffers()}
        cloned = [c.clone() if isinstance(c, Tensor) else c for c in carry]
        out = torch.func.functional_call(self._suffix, copies, (activation.clone(), *cloned))
        return out, copies

    def write_back_buffers(self, copies: dict[str, Tensor]) -> None:
        """Copy what :meth:`suffix_on_buffer_copies` left in its buffer copies into the model."""
        with torch.no_grad():
            for name, buffer in self._suffix.named_buffers():
                if name in copies:
                    buffer.copy_(copies[name])

    def suffix_on_owned(self, activation: Tensor, *carry: Any) -> Tensor:
        """:meth:`suffix` without the defensive clones, for inputs the caller built for this call
        (Ablation-CAM's ablated copies): the network may overwrite them."""
        return self._suffix(activation, *carry)


# Keyed by id(model); when a model dies a weakref.finalize releases its splits and queues the
# entry, which the next eager get_split removes before any lookup (so before the id is reused by
# a lookup). A plain dict with an int key is what torch.compile guards cheaply and stably: a
# WeakKeyDictionary makes Dynamo guard on the position of the model among its keys, which
# changes whenever another model is collected.
# A key is a layer (its LayerSplit) or a tuple of layers (their LayerChain).
_SPLIT_CACHE: dict[
    int, dict[str | tuple[str, ...], tuple[tuple, LayerSplit | LayerChain | None]]
] = {}
_SPLIT_LOCK = threading.Lock()


_DEAD: list[int] = []  # ids of dead models whose entries the next eager get_split drops


def _forget_model(model_id: int) -> None:
    """Finalizer of a model: release its splits now (their layers and weights are freed), and
    queue its entry for removal. The cache itself is not touched here: a finalizer can run in the
    middle of a torch.compile trace that is reading the dict ("dictionary changed size")."""
    for _, split in list(_SPLIT_CACHE.get(model_id, {}).values()):
        if split is not None:
            split.release()
    _DEAD.append(model_id)


def _drop_dead_models() -> None:
    while _DEAD:
        _SPLIT_CACHE.pop(_DEAD.pop(), None)


def _cached(
    model: nn.Module,
    key: str | tuple[str, ...],
    build: Callable[[], LayerSplit | LayerChain | None],
) -> LayerSplit | LayerChain | None:
    """The cache entry of (model, key), built by ``build`` when missing or stale."""
    signature = _structure_signature(model)
    with _SPLIT_LOCK:
        _drop_dead_models()  # before the lookup: a new model may have a dead one's id
        per_model = _SPLIT_CACHE.get(id(model))
        if per_model is None:
            per_model = _SPLIT_CACHE[id(model)] = {}
            weakref.finalize(model, _forget_model, id(model))
        cached = per_model.get(key)
        if cached is not None and cached[0] == signature:
            return cached[1]
        if cached is not None and cached[1] is not None:
            cached[1].release()
        built = build()
        per_model[key] = (signature, built)
        return built


def get_split(model: nn.Module, layer: str) -> LayerSplit | None:
    """The cached split of ``model`` at ``layer``, or ``None`` if torch.fx cannot trace it."""
    if torch.compiler.is_compiling():
        # Tracing cannot run torch.fx or take the lock: the split must exist already (built by
        # an eager call or by prepare()). Dynamo guards on the modules, so no signature check.
        cached = _SPLIT_CACHE.get(id(model), {}).get(layer)
        if cached is None:
            raise RuntimeError(
                f"layer {layer!r}: the model is split at the layer on the first eager call; "
                "call fastxai.capture.prepare(model, layer) (or the method once) outside "
                "torch.compile, or use fastxai.nn.Explainer, which prepares at construction"
            )
        return cached[1]  # type: ignore[return-value]

    def build() -> LayerSplit | None:
        try:
            return LayerSplit(model, layer)
        except ValueError as exc:
            if not isinstance(exc, torch.fx.proxy.TraceError):
                raise  # our own errors (e.g. a call index out of range)
            return _fallback(model, layer, exc)
        except Exception as exc:  # untraceable control flow: documented hook fallback
            return _fallback(model, layer, exc)

    return _cached(model, layer, build)  # type: ignore[return-value]


def get_chain(model: nn.Module, layers: Sequence[str]) -> LayerChain | None:
    """The cached chain of ``model`` cut at ``layers``, or ``None`` where one trace cannot give
    them all (untraceable model, a layer not reached): those layers are captured one by one, by
    the path that reports such errors. Inside ``torch.compile`` only a chain built before (by an
    eager call or :func:`prepare`) is used."""
    key = tuple(layers)
    if torch.compiler.is_compiling():
        cached = _SPLIT_CACHE.get(id(model), {}).get(key)
        return None if cached is None else cached[1]  # type: ignore[return-value]

    def build() -> LayerChain | None:
        try:
            return LayerChain(model, layers, [split_layer_ref(layer) for layer in layers])
        except Exception:  # the per-layer path raises or falls back to hooks with its message
            return None

    return _cached(model, key, build)  # type: ignore[return-value]


def prepare(model: nn.Module, layers: str | nn.Module | Sequence[str | nn.Module]) -> None:
    """Build and cache the split of ``model`` at each layer, and the chain of several layers,
    now (eagerly).

    Needed once before a ``torch.compile``'d call reaches a (model, layers) pair for the first
    time: torch.fx tracing cannot run inside a compiled region (a compiled call whose chain was
    not built captures the layers one by one).
    """
    names = [
        resolve_layer(model, layer)
        for layer in (layers if isinstance(layers, (list, tuple)) else [layers])
    ]
    for name in names:
        get_split(model, name)
    if len(names) > 1:
        get_chain(model, names)


def _fallback(model: nn.Module, layer: str, exc: Exception) -> None:
    """Warn once per (model, layer) that the hook path is used; return no split."""
    warn_user_once(
        ("fx fallback", id(model), layer),
        f"torch.fx could not trace the model ({type(exc).__name__}: {exc}); "
        "fastxai falls back to a temporary forward hook at the layer (safe across "
        "threads; not compilable with torch.compile(fullgraph=True))",
    )


@dataclass
class LayerCapture:
    """What one layer yields for one batch.

    Attributes:
        activation: ``(N, C, h, w)`` layer output (after ``reshape_transform``), detached.
        gradient: ``(N, C, h, w)`` gradient of the summed target scores w.r.t. it, or ``None``.
        logits: the model's output, ``(N, K)`` logits for a classifier (``(N, ...)`` for
            other models, explained through ``targets`` callables).
        targets: the resolved targets (class indices and/or callables, scores).
        raw_activation: the layer output before ``reshape_transform``.
        carry: the other values the suffix reads (empty where ``split`` is ``None``).
        split: the layer's own split when the capture ran through it; ``None`` on the hook
            path and for layers captured together by a :class:`~fastxai.layer_chain.LayerChain`
            (``capture_layers(..., own_splits=True)`` gives every layer its split).
        layer: the layer's dotted name (with its ``@k`` call index, if any).
    """

    activation: Tensor
    gradient: Tensor | None
    logits: Tensor
    targets: ResolvedTargets
    raw_activation: Tensor
    carry: tuple
    split: LayerSplit | None
    layer: str


def _apply_transform(t: Tensor, reshape_transform: ReshapeTransform | None, layer: str) -> Tensor:
    if reshape_transform is not None:
        t = reshape_transform(t)
    if not isinstance(t, Tensor) or t.dim() != 4:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(
            f"layer {layer!r} yields {shape}; CAM methods need (N, C, h, w) feature maps. "
            "For token outputs (N, 1 + h*w, C) pass reshape_transform to rearrange them"
        )
    return t


def _check_output(out: Any, n: int) -> Any:
    """The model's output: a tensor with one row per image (class logits ``(N, K)``, or any
    other shape such as segmentation scores ``(N, K, H, W)`` that ``targets`` callables read),
    or a list of one output per image (a torchvision detector's dicts of boxes, labels and
    scores)."""
    if isinstance(out, (list, tuple)) and len(out) == n and not isinstance(out, Tensor):
        return out
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"model must return a tensor with one row per image, shape ({n}, ...), or a list "
            f"of {n} per-image outputs, got {shape}"
        )
    return out


def _detached(tree: Any) -> Any:
    """``tree`` (a tensor, or dicts/lists/tuples of them) with every tensor detached."""
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def _differentiable_leaves(tree: Any) -> list[Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, Tensor) and t.requires_grad]


def capture_layer(
    model: nn.Module,
    x: Tensor,
    layer: str,
    targets: Any,
    *,
    with_gradient: bool,
    reshape_transform: ReshapeTransform | None = None,
    logits_graph: bool = False,
    create_graph: bool = False,
) -> LayerCapture:
    """Run ``model`` on ``x`` once, returning the layer's activation and, if asked, its gradient.

    The gradient is :math:`g = \\partial (\\sum_n s_n(f(x)_n)) / \\partial A`, where :math:`s_n`
    is the
    target score of image ``n`` (its class logit, or a callable of its output).

    By default nothing is recorded for autograd and every tensor returned is detached. With
    ``logits_graph`` or ``create_graph``, when grad is enabled, the forward is the model's own
    (buffers such as BatchNorm's running statistics update as in ``model(x)``) and the logits
    keep their graph; ``create_graph`` also keeps the activation and the gradient in it, the
    gradient taken with its own graph (double backward through it).
    """
    split = get_split(model, layer)
    if (logits_graph or create_graph) and torch.is_grad_enabled():
        if split is None:
            return _capture_with_hook(
                model, x, layer, targets, with_gradient, reshape_transform, True, create_graph
            )
        return _capture_in_graph(
            split, x, layer, targets, with_gradient, reshape_transform, create_graph
        )
    with torch.no_grad():
        if split is None:
            return _capture_with_hook(model, x, layer, targets, with_gradient, reshape_transform)
        a_raw, *carry = split.prefix(x)
        if not isinstance(a_raw, Tensor):  # a dict or tuple at the layer (a detector's FPN)
            return _capture_with_hook(model, x, layer, targets, with_gradient, reshape_transform)
        if not with_gradient:
            logits = _check_output(split.suffix(a_raw, *carry), x.shape[0])
            resolved = resolve_targets(targets, logits)
            activation = _apply_transform(a_raw, reshape_transform, layer)
            return LayerCapture(
                activation, None, logits, resolved, a_raw, tuple(carry), split, layer
            )
        # torch.func.vjp differentiates even under the no_grad above (it ignores outer grad
        # modes), while the prefix and every parameter stay out of any autograd graph.
        logits, vjp_fn = torch.func.vjp(lambda a: split.suffix(a, *carry), a_raw)
        logits = _check_output(logits, x.shape[0])
        resolved = resolve_targets(targets, logits)
        (g_raw,) = vjp_fn(resolved.cotangent(logits))
        activation = _apply_transform(a_raw, reshape_transform, layer)
        gradient = _apply_transform(g_raw, reshape_transform, layer)
        return LayerCapture(
            activation.detach(),
            gradient.detach(),
            logits.detach(),
            resolved,
            a_raw.detach(),
            tuple(carry),
            split,
            layer,
        )


def _score_cotangent(resolved: ResolvedTargets, logits: Tensor, create_graph: bool) -> Tensor:
    """:meth:`ResolvedTargets.cotangent`; with ``create_graph`` a callable's cotangent keeps its
    dependence on the logits (a softmax score's second derivative), by a composable transform."""
    if create_graph and resolved.callables is not None:
        return torch.func.grad(lambda out: resolved.scores(out).sum())(logits)
    return resolved.cotangent(logits.detach())


def _capture_in_graph(
    split: LayerSplit,
    x: Tensor,
    layer: str,
    targets: Any,
    with_gradient: bool,
    reshape_transform: ReshapeTransform | None,
    create_graph: bool,
) -> LayerCapture:
    """:func:`capture_layer` with grad enabled, the logits (and with ``create_graph`` the
    activation and gradient) in the autograd graph of the parameters and ``x``."""
    a_raw, *carry = split.prefix(x)
    g_raw = None
    if not with_gradient:
        logits = _check_output(split.suffix(a_raw, *carry), x.shape[0])
        resolved = resolve_targets(targets, logits.detach())
    else:
        # The vjp composes with the outer autograd: its primal output keeps the graph, and its
        # gradient does too when computed with grad enabled.
        logits, vjp_fn, copies = torch.func.vjp(
            lambda a: split.suffix_on_buffer_copies(a, *carry), a_raw, has_aux=True
        )
        split.write_back_buffers(copies)
        logits = _check_output(logits, x.shape[0])
        resolved = resolve_targets(targets, logits.detach())
        with torch.set_grad_enabled(create_graph):
            (g_raw,) = vjp_fn(_score_cotangent(resolved, logits, create_graph))
    keep = (lambda t: t) if create_graph else Tensor.detach
    activation = keep(_apply_transform(a_raw, reshape_transform, layer))
    gradient = None if g_raw is None else keep(_apply_transform(g_raw, reshape_transform, layer))
    carry = [c.detach() if isinstance(c, Tensor) else c for c in carry]
    return LayerCapture(
        activation, gradient, logits, resolved, keep(a_raw), tuple(carry), split, layer
    )


def _capture_with_hook(
    model: nn.Module,
    x: Tensor,
    layer: str,
    targets: Any,
    with_gradient: bool,
    reshape_transform: ReshapeTransform | None,
    in_graph: bool = False,
    create_graph: bool = False,
) -> LayerCapture:
    """The capture through a forward hook that lives for one call. The layer may yield a tensor
    or a dict/tuple of them (``reshape_transform`` then makes the ``(N, C, h, w)`` map), and the
    model may return a list of per-image outputs (read by ``targets`` callables)."""
    name, call_index = split_layer_ref(layer)
    module = model.get_submodule(name)
    seen: list[Any] = []
    owner = threading.get_ident()

    def as_leaf(t: Any) -> Any:
        if not isinstance(t, Tensor) or not t.is_floating_point():
            return t
        if in_graph and t.requires_grad:  # the graph to the parameters before it stays
            return t
        return t.detach().requires_grad_(with_gradient)

    def keep_output(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if threading.get_ident() != owner:  # another thread's forward of the same model
            return None
        seen.append(output)
        if len(seen) - 1 != call_index:
            return None
        leaf = tree_map(as_leaf, output)
        seen[-1] = leaf
        # The network may modify its copy in place; ours stays intact.
        return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, leaf)

    handle = module.register_forward_hook(keep_output)
    try:
        with torch.set_grad_enabled(with_gradient or in_graph):
            logits = _check_output(model(x), x.shape[0])
    finally:
        handle.remove()
    if len(seen) <= call_index:
        raise ValueError(f"layer {layer!r}: the module is called {len(seen)} time(s) in forward")
    a_raw = seen[call_index]
    resolved = resolve_targets(targets, _detached(logits))
    gradient = None
    if with_gradient:
        leaves = _differentiable_leaves(a_raw)
        if isinstance(logits, Tensor):
            scores, cotangent = logits, _score_cotangent(resolved, logits, create_graph)
        else:  # per-image outputs: the summed scores of the callables
            with torch.enable_grad():
                scores, cotangent = resolved.scores(logits).sum(), None
        grads = torch.autograd.grad(
            scores,
            leaves,
            cotangent,
            retain_graph=in_graph,
            create_graph=create_graph,
            allow_unused=True,
            materialize_grads=True,
        )
        by_leaf = dict(zip(map(id, leaves), grads, strict=True))
        g_raw = tree_map(lambda t: by_leaf.get(id(t), t) if isinstance(t, Tensor) else t, a_raw)
        gradient = _apply_transform(g_raw, reshape_transform, layer)
    keep = (lambda t: t) if create_graph else _detached
    activation = _apply_transform(keep(a_raw), reshape_transform, layer)
    return LayerCapture(
        activation,
        None if gradient is None else keep(gradient),
        logits if in_graph else _detached(logits),
        resolved,
        keep(a_raw),
        (),
        None,
        layer,
    )


def capture_layers(
    model: nn.Module,
    x: Tensor,
    layers: Sequence[str],
    targets: Any,
    *,
    with_gradient: bool,
    reshape_transform: ReshapeTransform | None = None,
    logits_graph: bool = False,
    create_graph: bool = False,
    own_splits: bool = False,
) -> list[LayerCapture]:
    """Every layer's :class:`LayerCapture` from one forward and, if asked, one backward pass.

    Several layers run through the model's :class:`~fastxai.layer_chain.LayerChain`: activations
    and gradients equal :func:`capture_layer`'s for each layer, at the cost of one forward and
    one backward to the shallowest layer. :func:`capture_layer` runs per layer (one forward and
    one vector-Jacobian product each) for a single layer, with ``own_splits=True`` (methods that
    re-run the network after a layer need its split and carry), in the autograd graph
    (``logits_graph`` / ``create_graph`` with grad enabled), on the hook path, and where one trace
    cannot cut at every layer.
    """
    in_graph = (logits_graph or create_graph) and torch.is_grad_enabled()
    several = not (own_splits or in_graph) and len(layers) > 1
    chain = get_chain(model, layers) if several else None
    if chain is None:
        return [
            capture_layer(
                model,
                x,
                layer,
                targets,
                with_gradient=with_gradient,
                reshape_transform=reshape_transform,
                logits_graph=logits_graph,
                create_graph=create_graph,
            )
            for layer in layers
        ]
    return _capture_chain(chain, x, targets, with_gradient, reshape_transform)


def _capture_chain(
    chain: LayerChain,
    x: Tensor,
    targets: Any,
    with_gradient: bool,
    reshape_transform: ReshapeTransform | None,
) -> list[LayerCapture]:
    boundaries: list[list[Any]] = []
    gradients: list[dict[int, Tensor]] = []
    with torch.no_grad():
        boundaries.append(list(chain.prefix(x)))
        if not with_gradient:
            for piece in chain.pieces[:-1]:
                boundaries.append(list(run_piece(piece, boundaries[-1])))
            logits = _check_output(run_piece(chain.pieces[-1], boundaries[-1]), x.shape[0])
            resolved = resolve_targets(targets, logits)
        else:
            # torch.func.vjp differentiates under the no_grad above (as in capture_layer).
            pullbacks = []
            for k, piece in enumerate(chain.pieces):
                inputs = differentiated(chain.differentiable[k], boundaries[k])
                others: list[Any] = []
                step = _vjp_step(piece, boundaries[k], inputs, chain.differentiable, k, others)
                primals = [boundaries[k][i] for i in inputs]
                out, pullback, tensors = torch.func.vjp(step, *primals, has_aux=True)
                pullbacks.append(pullback)
                if k + 1 < len(chain.pieces):
                    # The next boundary: its tensors as vjp returns the auxiliary output, other
                    # values (sizes) as the piece returned them.
                    produced = iter(tensors)
                    boundaries.append([next(produced) if o is None else o for o in others])
            logits = _check_output(out, x.shape[0])
            resolved = resolve_targets(targets, logits)
            cotangents: Any = resolved.cotangent(logits)
            for k in reversed(range(len(chain.pieces))):
                inputs = differentiated(chain.differentiable[k], boundaries[k])
                cotangents = pullbacks[k](cotangents)
                gradients.append(dict(zip(inputs, cotangents, strict=True)))
            gradients.reverse()
    captures = []
    for layer, k, slot in zip(chain.layers, chain.position, chain.slot, strict=True):
        a_raw = boundaries[k][slot]
        gradient = None
        if with_gradient:
            if slot not in gradients[k]:
                raise ValueError(f"layer {layer!r}: its output is not a floating-point tensor")
            gradient = _apply_transform(gradients[k][slot], reshape_transform, layer).detach()
        activation = _apply_transform(a_raw, reshape_transform, layer).detach()
        captures.append(
            LayerCapture(
                activation, gradient, logits.detach(), resolved, a_raw.detach(), (), None, layer
            )
        )
    return captures


def _vjp_step(
    piece: fx.GraphModule,
    boundary: list[Any],
    inputs: list[int],
    masks: list[list[bool]],
    k: int,
    others: list[Any],
) -> Callable[..., Any]:
    """The function of piece ``k`` that ``torch.func.vjp`` differentiates: the boundary's
    differentiated values in, the next boundary's differentiated values out (the model's output
    for the last piece). The next boundary's tensors are the auxiliary output (vjp accepts only
    tensors there); its other values go to ``others``, with ``None`` where a tensor stands."""
    last = k + 1 == len(masks)

    def step(*primals: Tensor) -> tuple[Any, tuple[Tensor, ...]]:
        values = list(boundary)
        for i, p in zip(inputs, primals, strict=True):
            values[i] = p
        out = run_piece(piece, values)
        if last:
            return out, ()
        outputs = differentiated(masks[k + 1], out)
        others.extend(None if isinstance(v, Tensor) else v for v in out)
        return tuple(out[i] for i in outputs), tuple(v for v in out if isinstance(v, Tensor))

    return step
