"""The fx tracer that leaves other threads alone: a model run in another thread while a trace is
in progress gets plain module calls and attributes."""

from __future__ import annotations

import threading

import torch
import torch.fx as fx
from torch import nn

from fastxai._tracing import ThreadOwnedTracer


class _PausesWhileTraced(nn.Module):
    """Its forward, when traced, signals ``started`` and waits for ``resume``."""

    def __init__(self, started: threading.Event, resume: threading.Event) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.started, self.resume = started, resume

    def forward(self, x):
        if isinstance(x, fx.Proxy):
            self.started.set()
            assert self.resume.wait(30)
        return self.conv(x).relu()


def _trace_while_another_thread_runs(
    tracer: fx.Tracer,
) -> tuple[list, torch.Tensor | None, torch.Tensor]:
    """``(graphs or the other thread's errors, its output, its output without any trace)``."""
    started, resume = threading.Event(), threading.Event()
    traced = _PausesWhileTraced(started, resume)
    other = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    expected = other[1](other[0](x))  # before any trace patches nn.Module
    graphs: list = []
    thread = threading.Thread(target=lambda: graphs.append(tracer.trace(traced)))
    thread.start()
    assert started.wait(30)
    try:
        errors: list = []
        try:
            out = other(x)
        except Exception as exc:  # what a plain fx.Tracer does to the other thread
            errors.append(exc)
            out = None
    finally:
        resume.set()
        thread.join()
    return errors or graphs, out, expected


def test_other_threads_run_their_models_while_a_trace_is_in_progress() -> None:
    result, out, expected = _trace_while_another_thread_runs(ThreadOwnedTracer())
    assert isinstance(result[0], fx.Graph)
    assert any(n.op == "call_module" and n.target == "conv" for n in result[0].nodes)
    assert isinstance(out, torch.Tensor) and not isinstance(out, fx.Proxy)
    torch.testing.assert_close(out, expected)


def test_a_plain_tracer_breaks_the_other_thread() -> None:
    # the failure the tracer exists for: without it the other thread's module call is traced
    result, _, _ = _trace_while_another_thread_runs(fx.Tracer())
    assert isinstance(result[0], NameError) and "not installed as a submodule" in str(result[0])


def test_a_call_that_reaches_the_tracer_after_its_trace_ended_passes_through() -> None:
    """A thread that entered fx's patched ``Module.__call__`` during a trace can reach the
    tracer's hooks after ``trace`` returned and cleared its root: they must run the module as
    is (a plain fx tracer looks the module up in its cleared root and fails)."""
    model = nn.Sequential(nn.Linear(3, 2))
    tracer = ThreadOwnedTracer()
    tracer.trace(model)
    x = torch.randn(4, 3)
    out = tracer.call_module(model[0], model[0].forward, (x,), {})
    torch.testing.assert_close(out, model[0](x), rtol=0, atol=0)
    weight = model[0].weight
    assert tracer.getattr("0.weight", weight, {}) is weight
