"""A torch.fx tracer that leaves other threads alone.

While ``fx.Tracer.trace`` runs it patches ``nn.Module.__call__`` and ``nn.Module.__getattr__``
for the whole process. A model that another thread runs meanwhile (another explanation of the
same model, a server's forward pass) would then be routed into this tracer and fail with
"module is not installed as a submodule" or receive proxies. This tracer serves only the thread
that started the trace; every other thread gets the plain module call and attribute.
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

    def _foreign(self) -> bool:
        return self._owner is not None and threading.get_ident() != self._owner

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
