r"""A model cut at several layers into a chain of graph pieces: one forward and one backward give
every layer's activation and gradient.

The model is traced once with :mod:`torch.fx`, the requested layers kept as leaves (a requested
layer that contains another requested layer is traced through, and its output is the value its
``forward`` returns), and cut after each layer's output node, in graph order
:math:`c_1 < \dots < c_L`:

.. math::
    b_1 = \mathrm{prefix}(x), \quad b_{k+1} = \mathrm{piece}_k(b_k), \quad
    y = \mathrm{piece}_L(b_L),

where the *boundary* :math:`b_k` holds every value computed up to :math:`c_k` that the rest of the
network still reads, layer ``k``'s output :math:`A_k` among them. Each piece runs under
``torch.func.vjp``; applying the pullbacks in reverse order from the target cotangent gives the
cotangent of every boundary, so :math:`\partial y / \partial A_k` for every layer comes out of one
backward pass that stops at the shallowest layer. The other boundary values are held fixed, as
in the single-layer split (:class:`fastxai.capture.LayerSplit`), so each gradient equals that
split's. Only boundary values downstream of some :math:`A_k` are differentiated; the rest (the
input image, values of a branch no layer feeds) are constants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

from fastxai._tracing import ThreadOwnedTracer, release_graph_module


class NotChainable(ValueError):
    """The layers cannot be cut from one trace (not reached, or not a value of the graph)."""


class _ChainTracer(ThreadOwnedTracer):
    """Keeps the requested layers as leaves (except those containing another requested layer,
    which are traced through) and records the output of every call of each requested layer."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names
        self.leaves = {n for n in names if not any(o.startswith(n + ".") for o in names)}
        self.calls: dict[str, list[Any]] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(
            m, module_qualified_name
        )

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        if not self._foreign():
            name = self.path_of_module(m)
            if name in self.names:
                self.calls.setdefault(name, []).append(out)
        return out


def _copy_range(
    graph: fx.Graph, nodes: Sequence[fx.Node], env: dict[fx.Node, fx.Node]
) -> Callable[[fx.Node], fx.Node]:
    """Copy ``nodes`` into ``graph``; an attribute fetch from an earlier piece is copied on first
    use (parameters are read where they are needed, never passed between pieces)."""

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op != "get_attr":
                raise AssertionError(f"{node} is neither in the boundary nor an attribute")
            env[node] = graph.node_copy(node, lookup)
        return env[node]

    for node in nodes:
        env[node] = graph.node_copy(node, lookup)
    return lookup


class LayerChain:
    """``prefix(x) -> b_1``, ``pieces[k](*b_{k+1}) -> b_{k+2}``, the last piece returns the
    model's output.

    Attributes:
        layers: the requested layer references, in the caller's order.
        position: for each requested layer, the index ``k`` of the boundary ``b_{k+1}`` whose
            ``slot[k]``-th value is its output (layers with the same output node share both).
        slot: see ``position``.
        differentiable: for each boundary, which of its values are downstream of a layer output
            (differentiated when they are floating-point tensors).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], refs: Sequence[tuple[str, int]]):
        tracer = _ChainTracer({name for name, _ in refs})
        graph = tracer.trace(model)
        outputs: list[fx.Node] = []
        for layer, (name, index) in zip(layers, refs, strict=True):
            calls = tracer.calls.get(name, [])
            if len(calls) <= index or not isinstance(calls[index], fx.Proxy):
                raise NotChainable(f"layer {layer!r} is not one value of the traced graph")
            node = calls[index].node
            if node.op in ("placeholder", "get_attr", "output"):
                raise NotChainable(f"layer {layer!r} returns its input or an attribute")
            outputs.append(node)
        nodes = list(graph.nodes)
        order = {n: i for i, n in enumerate(nodes)}
        cuts = sorted(set(outputs), key=order.__getitem__)

        downstream: set[fx.Node] = set(cuts)
        frontier = list(cuts)
        while frontier:
            for user in frontier.pop().users:
                if user not in downstream and user.op != "output":
                    downstream.add(user)
                    frontier.append(user)

        boundaries: list[list[fx.Node]] = []
        for cut in cuts:
            p = order[cut]
            boundaries.append(
                [
                    n
                    for n in nodes[: p + 1]
                    if n.op != "get_attr" and (n is cut or any(order[u] > p for u in n.users))
                ]
            )

        prefix_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        _copy_range(prefix_graph, nodes[: order[cuts[0]] + 1], env)
        prefix_graph.output(tuple(env[n] for n in boundaries[0]))

        piece_graphs = []
        ends = [order[c] for c in cuts] + [len(nodes) - 1]  # the last piece ends at the output
        for k, boundary in enumerate(boundaries):
            piece = fx.Graph()
            penv = {n: piece.placeholder(f"b{k}_{i}") for i, n in enumerate(boundary)}
            body = nodes[ends[k] + 1 : ends[k + 1] + 1]
            if k + 1 < len(boundaries):
                lookup = _copy_range(piece, body, penv)
                piece.output(tuple(lookup(n) for n in boundaries[k + 1]))
            else:
                _copy_range(piece, body, penv)  # ends with the model's own output node
            piece_graphs.append(piece)

        self.layers = list(layers)
        self.position = [cuts.index(n) for n in outputs]
        self.slot = [boundaries[k].index(n) for k, n in zip(self.position, outputs, strict=True)]
        self.differentiable = [[n in downstream for n in b] for b in boundaries]
        self.prefix = fx.GraphModule(model, prefix_graph)
        self.pieces = [fx.GraphModule(model, g) for g in piece_graphs]

    def release(self) -> None:
        """Let go of the model's layers and weights (the model died or changed)."""
        for module in (self.prefix, *self.pieces):
            release_graph_module(module)


def run_piece(piece: fx.GraphModule, boundary: Sequence[Any]) -> Any:
    """Run one piece on a boundary. Tensors are cloned first: in-place operations of the network
    (ReLUs, residual adds) would otherwise overwrite the previous boundary, whose values are
    returned as activations."""
    return piece(*[v.clone() if isinstance(v, Tensor) else v for v in boundary])


def differentiated(mask: Sequence[bool], boundary: Sequence[Any]) -> list[int]:
    """Positions of the boundary values that are differentiated: downstream of a layer output
    and floating-point tensors."""
    return [
        i
        for i, (m, v) in enumerate(zip(mask, boundary, strict=True))
        if m and isinstance(v, Tensor) and v.is_floating_point()
    ]
