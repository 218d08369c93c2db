"""The classifier split into logits plus the activations Activation Matching compares.

A frozen twin of the model (a structural copy whose parameters are detached views of the user's,
sharing storage, and whose buffers are the user's own) is traced once with :mod:`torch.fx`, the
matched layers kept as leaves, into a graph that returns ``(logits, a_1, ..., a_L)``. The trace is
cached per (model, layers) and rebuilt when the model's modules, parameters or mode change. No
gradient reaches (or is written to) the user's model, nothing on it is swapped or hooked, and
in-place weight updates of the model are seen by the next call.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from fastxai._tracing import ThreadOwnedTracer, release_graph_module
from fastxai.capture import resolve_layer, split_layer_ref

COSINE = "cosine"
STANDARDISED_MSE = "std_mse"
DISTANCES = (COSINE, STANDARDISED_MSE)

RESNET_LAYERS = ("relu", "layer1", "layer2", "layer3", "layer4")
# The notebook's weights and distances for those five layers (the authors' notebook).
STAGE_WEIGHTS = (1.0, 2.0, 2.0, 4.0, 8.0)
STAGE_DISTANCES = (COSINE, COSINE, STANDARDISED_MSE, STANDARDISED_MSE, STANDARDISED_MSE)


@dataclass(frozen=True)
class MatchedLayer:
    """One term of :math:`L_{act}`: the layer (dotted name, optional ``@k`` call index), its
    weight :math:`\\alpha_\\ell` and its distance (``"cosine"`` or ``"std_mse"``)."""

    name: str
    weight: float
    distance: str


class _LeavesTracer(ThreadOwnedTracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(
            m, module_qualified_name
        )


def frozen_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules whose parameters are detached views of the originals."""
    memo: dict[int, object] = {id(p): p.detach() for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _trace(model: nn.Module, names: Sequence[str]) -> tuple[fx.GraphModule, list[fx.Node]]:
    """Trace ``model`` keeping ``names`` as leaves; return the graph module and the call node of
    each name (its ``@k`` call)."""
    bare = {split_layer_ref(n)[0] for n in names}
    tracer = _LeavesTracer(bare)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # untraceable control flow in the user's model
        raise ValueError(
            f"activation_matching needs a torch.fx-traceable model; tracing "
            f"{type(model).__name__} failed ({type(exc).__name__}: {exc})"
        ) from exc
    nodes = []
    for name in names:
        bare_name, call_index = split_layer_ref(name)
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == bare_name]
        if len(calls) <= call_index:
            raise ValueError(
                f"layers: {name!r} is called {len(calls)} time(s) in the model's forward"
            )
        nodes.append(calls[call_index])
    return fx.GraphModule(model, graph), nodes


def _build_extractor(model: nn.Module, names: Sequence[str]) -> fx.GraphModule:
    module, nodes = _trace(frozen_twin(model), names)
    graph = module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    (logits,) = output.args
    with graph.inserting_before(output):
        # A clone: torchvision's in-place ReLUs and residual adds may overwrite a layer's output.
        kept = [graph.call_method("clone", (node,)) for node in nodes]
    output.args = ((logits, *kept),)
    graph.lint()
    module.recompile()
    return module


def _signature(model: nn.Module) -> tuple:
    modules = tuple((name, id(m), m.training) for name, m in model.named_modules())
    tensors = tuple(id(t) for t in (*model.parameters(), *model.buffers()))
    return modules, tensors


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, ...], tuple[tuple, fx.GraphModule]]]
_CACHE = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _release_all(per_model: dict[tuple[str, ...], tuple[tuple, fx.GraphModule]]) -> None:
    for _, extractor in per_model.values():
        release_graph_module(extractor)
    per_model.clear()


def feature_extractor(model: nn.Module, names: Sequence[str]) -> fx.GraphModule:
    """The cached graph ``x -> (logits, a_1, ..., a_L)`` of ``model`` at layers ``names``."""
    key = tuple(names)
    signature = _signature(model)
    with _LOCK:
        per_model = _CACHE.get(model)
        if per_model is None:
            per_model = _CACHE[model] = {}
            weakref.finalize(model, _release_all, per_model)
        cached = per_model.get(key)
        if cached is not None and cached[0] == signature:
            return cached[1]
        if cached is not None:
            release_graph_module(cached[1])
        extractor = _build_extractor(model, names)
        per_model[key] = (signature, extractor)
        return extractor


def run_extractor(extractor: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``(logits, [a_1, ..., a_L])`` of ``x``."""
    logits, *features = extractor(x)
    return logits, list(features)


def _stage_candidates(model: nn.Module) -> list[str]:
    """Modules whose outputs may end a stage: the children of the model's longest
    ``nn.Sequential``/``nn.ModuleList`` (EfficientNet's ``_blocks`` or ``features``,
    MobileNet's ``features``, ...)."""
    best: tuple[int, str] = (0, "")
    for name, module in model.named_modules():
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) > best[0]:
            best = (len(module), name)
    if best[0] == 0:
        return []
    prefix = f"{best[1]}." if best[1] else ""
    container = model.get_submodule(best[1]) if best[1] else model
    return [f"{prefix}{child}" for child, _ in container.named_children()]


def default_layers(model: nn.Module, x: Tensor) -> list[MatchedLayer]:
    """The matched layers when none are given.

    * ResNets (``relu``, ``layer1`` .. ``layer4`` present): stem ReLU and the four stages, weights
      1/2/2/4/8, cosine distance for the first two, standardised MSE for the rest (the notebook).
    * Other models: the children of the model's longest ``nn.Sequential``/``nn.ModuleList``
      (EfficientNet's blocks, MobileNet's ``features``); of those, the last one at each of the
      five finest spatial resolutions (for EfficientNet-Lite0 at 224: blocks 0, 2, 4, 10, 15 at
      112, 56, 28, 14, 7), weighted and measured like the ResNet stages, finest first.
    """
    names = {n for n, _ in model.named_modules() if n}
    if set(RESNET_LAYERS) <= names:
        return [
            MatchedLayer(n, w, d)
            for n, w, d in zip(RESNET_LAYERS, STAGE_WEIGHTS, STAGE_DISTANCES, strict=True)
        ]
    candidates = _stage_candidates(model)
    if not candidates:
        raise ValueError(
            f"layers: no default for {type(model).__name__} (no ResNet stages and no "
            "nn.Sequential of blocks); pass layers=[...]"
        )
    extractor = feature_extractor(model, candidates)
    with torch.no_grad():
        _, features = run_extractor(extractor, x[:1])
    last_at_size: dict[tuple[int, ...], str] = {}
    for name, feature in zip(candidates, features, strict=True):
        if feature.dim() == 4:
            last_at_size[tuple(feature.shape[-2:])] = name
    by_fineness = sorted(last_at_size.items(), key=lambda item: -item[0][0] * item[0][1])[:5]
    return [
        MatchedLayer(name, w, d)
        for (_, name), w, d in zip(by_fineness, STAGE_WEIGHTS, STAGE_DISTANCES, strict=False)
    ]


def normalise_layers(model: nn.Module, x: Tensor, layers: object) -> list[MatchedLayer]:
    """``layers`` as :class:`MatchedLayer` s: ``None`` (defaults), a sequence of names/modules
    (weight 1, standardised MSE) or of ``(name, weight, distance)`` / :class:`MatchedLayer`."""
    if layers is None:
        return default_layers(model, x)
    if isinstance(layers, (str, nn.Module)) or not isinstance(layers, Sequence):
        layers = [layers]
    if not layers:
        raise ValueError("layers: expected None or a non-empty sequence of layers")
    out: list[MatchedLayer] = []
    for item in layers:
        if isinstance(item, MatchedLayer):
            name, weight, distance = item.name, item.weight, item.distance
        elif isinstance(item, (tuple, list)):
            if len(item) != 3:
                raise ValueError(f"layers: expected (name, weight, distance), got {item!r}")
            name, weight, distance = item
        else:
            name, weight, distance = item, 1.0, STANDARDISED_MSE
        if distance not in DISTANCES:
            raise ValueError(f"layers: distance must be one of {DISTANCES}, got {distance!r}")
        out.append(MatchedLayer(resolve_layer(model, name), float(weight), distance))
    return out
