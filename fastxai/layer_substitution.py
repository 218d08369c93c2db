"""The whole model re-run with one layer's output replaced by a given value.

Methods that evaluate the model on modified layer outputs (Ablation-CAM's ablated channels,
Shapley-CAM's second derivative) normally run only the network after the layer
(:class:`fastxai.capture.LayerSplit`). Where that network cannot run on its own (torch.fx cannot
trace the model, or it reads values computed before the layer that are not batched tensors) they
run the whole model instead, through :func:`output_substituted`: a temporary forward hook makes
the layer's call return the given value. Everything before the layer is computed again on every
run, which is the price of not needing the split. The hook serves only the thread that
registered it and is removed when the block ends, whether it returned or raised.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn


class OutputSubstitution:
    """Runs ``model`` with call ``call_index`` of ``module`` returning a value of the caller's
    (see :func:`output_substituted`)."""

    def __init__(self, model: nn.Module, module: nn.Module, call_index: int) -> None:
        self.model = model
        self.module = module
        self.call_index = call_index
        self.value: Any = None
        self.calls = 0

    def run(self, x: Tensor, value: Any) -> Any:
        """``model(x)`` with the layer's output replaced by ``value`` (used as it is: the network
        after the layer may modify it in place)."""
        self.value, self.calls = value, 0
        try:
            output = self.model(x)
        finally:
            self.value = None
        if self.calls <= self.call_index:
            raise ValueError(
                f"layer: the re-run of the model called the layer {self.calls} time(s), so its "
                f"call {self.call_index} could not be replaced"
            )
        return output


@contextmanager
def output_substituted(
    model: nn.Module,
    module: nn.Module,
    call_index: int = 0,
    *,
    layer_on_first_row: bool = False,
) -> Iterator[OutputSubstitution]:
    """A block in which ``substitution.run(x, value)`` runs ``model(x)`` with call
    ``call_index`` of ``module`` returning ``value``.

    ``layer_on_first_row``: the replaced call of the layer runs on the first row of its first
    input only (its output is discarded), for a layer that takes one batched tensor and whose
    own work is large (a detector's backbone).
    """
    substitution = OutputSubstitution(model, module, call_index)
    owner = threading.get_ident()

    def first_row_only(_module: nn.Module, args: tuple) -> tuple | None:
        if threading.get_ident() != owner or substitution.calls != call_index or not args:
            return None
        if isinstance(args[0], Tensor) and args[0].dim() > 0:
            return (args[0][:1], *args[1:])
        return None

    def replace_output(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if threading.get_ident() != owner:  # another thread's forward of the same model
            return None
        substitution.calls += 1
        if substitution.calls - 1 != call_index:
            return None
        return substitution.value

    handles = [module.register_forward_hook(replace_output)]
    try:
        if layer_on_first_row:
            handles.append(module.register_forward_pre_hook(first_row_only))
        yield substitution
    finally:
        for handle in handles:
            handle.remove()
