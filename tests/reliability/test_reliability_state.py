"""No public call changes the model or the input: mode, requires_grad, .grad, hooks, parameters,
buffers and the input tensor are the same afterwards, also when the call raises midway."""

from __future__ import annotations

import warnings

import pytest
import torch
from reliability_cases import ENTRY_POINTS, Boom, Entry, exploding_target, images, small_net
from torch import nn


def snapshot(model: nn.Module, x: torch.Tensor) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "hooks": [
            (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
            for m in model.modules()
        ],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "x": x.clone(),
        "x_version": x._version,
        "x_requires_grad": x.requires_grad,
    }


def assert_unchanged(before: dict, after: dict) -> None:
    for key in ("training", "requires_grad", "grad_ids", "hooks", "x_version", "x_requires_grad"):
        assert before[key] == after[key], key
    for a, b in zip(before["grad"], after["grad"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    for name, value in before["state"].items():
        assert torch.equal(value, after["state"][name]), name
    assert torch.equal(before["x"], after["x"])


def prepared_model(entry: Entry | None = None, training: bool = False) -> nn.Module:
    """The entry's model with user state a careless explainer would disturb: a .grad on the
    last parameter, a frozen first parameter, a user's forward hook on the first child."""
    model = (entry.make_model() if entry is not None else small_net(3)).train(training)
    params = list(model.parameters())
    params[-1].grad = torch.full_like(params[-1], 0.5)
    params[0].requires_grad_(False)
    next(model.children()).register_forward_hook(lambda m, i, o: None)
    return model


def call(entry: Entry, model: nn.Module, x: torch.Tensor, targets=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # training-mode and hook-fallback warnings
        return entry.run(model, x, targets)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: e.name)
def test_state_unchanged_after_call(entry, training):
    """Also in training mode: BatchNorm's running statistics are not updated."""
    model, x = prepared_model(entry, training), images(2, entry.image_size)
    before = snapshot(model, x)
    if training and entry.name.startswith(("srd", "apop")):  # SRD decomposes eval-mode nets
        with pytest.raises(ValueError, match="training mode"):
            call(entry, model, x)
    else:
        call(entry, model, x)
    assert_unchanged(before, snapshot(model, x))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: e.name)
def test_state_unchanged_when_call_raises_midway(entry, training):
    model, x = prepared_model(entry, training), images(2, entry.image_size)
    before = snapshot(model, x)
    with pytest.raises((Boom, ValueError, FloatingPointError)):  # NaN loss: activation_matching
        if entry.midway is not None:
            entry.midway(model, x)
        else:
            assert entry.takes_targets, f"{entry.name}: give the entry a midway failure"
            # After the model's forward: the target callable raises (or, for functions that
            # need class indices, the callable is refused once the logits exist).
            call(entry, model, x, exploding_target)
    assert_unchanged(before, snapshot(model, x))


def test_training_mode_and_input_requiring_grad_are_kept():
    model, x = prepared_model(training=True), images(2, 32).requires_grad_(True)
    before = snapshot(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fastxai

        fastxai.gradcam(model, x, "features", tft=True)
    assert_unchanged(before, snapshot(model, x))
    assert x.grad is None


class TraceBreaker(nn.Module):
    """Shape-dependent Python control flow: torch.fx cannot trace it, so fastxai uses its
    temporary forward hook; the forward then raises on a large batch (TFT's ladder)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_net(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            raise Boom("batch too large")
        return self.net(x)


def test_hook_fallback_leaves_no_hook_when_the_model_raises():
    import fastxai

    model = TraceBreaker().eval()
    x = images(2, 32)
    before = snapshot(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explanation = fastxai.gradcam(model, x, "net.features")  # hook path, succeeds
        assert explanation.maps.shape == (2, 32, 32)
        with pytest.raises(Boom):
            fastxai.gradcam(model, x, "net.features", tft=True)  # ladder of 20 images raises
        with pytest.raises(Boom):
            fastxai.gradcam(model, images(5, 32), "net.features")  # raises inside the hooked pass
    assert_unchanged(before, snapshot(model, x))
