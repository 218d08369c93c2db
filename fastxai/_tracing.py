"""A torch.fx tracer that leaves other threads alone.

While ``fx.Tracer.trace`` runs it patches ``nn.Module.__call__`` and ``nn.Module.__getattr__``
for the whole process. A model that another thread runs meanwhile (another explanation of the
same model, a server's forward pass) would then be routed into this tracer and fail with
"module is not installed as a submodule" or receive proxies. This tracer serves only the thread
that started the trace; every other thread gets the plain module call and attribute.

It also forgets the traced module when the trace ends: ``fx.Tracer.trace`` leaves the tracer in
a reference cycle (closures of its patched calls), so a tracer that kept ``root`` kept the
user's model alive until the cycle collector ran, after the user dropped it.
"""

from __future__ import annotations

import threading
from typing import Any

import torch.fx as fx
from torch import nn


class ThreadOwnedTracer(fx.Tracer):
    """:class:`torch.fx.Tracer` whose patched module calls and attribute reads pass straight
    through in threads other than the one tracing."""

    _owner: int | None = None

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._owner = threading.get_ident()
        try:
            return super().trace(root, concrete_args)
        finally:
            self._owner = None
            self.root = None  # type: ignore[assignment]
            self.submodule_paths = None
            self.tensor_attrs = {}

    def _foreign(self) -> bool:
        # Not tracing counts as foreign too: a thread that entered fx's patched ``__call__``
        # while this tracer ran may reach it after ``trace`` has returned and cleared ``root``.
        return threading.get_ident() != self._owner

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self._foreign():
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._foreign():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def release_graph_module(module: nn.Module) -> None:
    """Drop a traced module's submodules, parameters and buffers. A ``GraphModule`` and its
    graph reference each other, so a dropped one waits for the cycle collector, and with it the
    user's layers and weights it references; released, it holds no tensor of the user's. Only
    the module's own attributes go: the layers it points at are the user's, left as they are (the
    containers ``GraphModule`` made for dotted targets are its own and die with it)."""
    module._modules.clear()
    module._parameters.clear()
    module._buffers.clear()
