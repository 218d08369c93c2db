"""Ablation-CAM and Shapley-CAM where the network after the layer cannot run on its own: the whole
model re-runs with the layer's output replaced (fastxai.layer_substitution).

Each fallback is compared with the split path on the same weights (the model behind a forward
that torch.fx cannot trace, or one whose network after the layer reads an int), with the same
rows per run: both then feed identical activations to identical layers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Untraceable
from torch import nn

import fastxai
from fastxai.capture import get_split
from fastxai.layer_substitution import OutputSubstitution, output_substituted

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.fx could not trace"),
    pytest.mark.filterwarnings("ignore:model .* is in training mode"),
]


class ReadsInputWidth(nn.Module):
    """``net`` whose output is scaled by ``width / width``: the network after any layer of
    ``net`` reads an int computed before it, so the split exists but cannot re-run alone."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.training = net.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        return self.net(x) * (width / width)


@pytest.fixture
def reruns(monkeypatch):
    """The number of whole-model re-runs made so far."""
    count = [0]
    run = OutputSubstitution.run

    def counted(self, x, value):
        count[0] += 1
        return run(self, x, value)

    monkeypatch.setattr(OutputSubstitution, "run", counted)
    return lambda: count[0]


def model_state(model: nn.Module) -> tuple:
    return (
        [(m, m.training) for m in model.modules()],
        [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
        [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def assert_same_state(before: tuple, after: tuple) -> None:
    assert before[:3] == after[:3]
    assert all(torch.equal(before[3][k], after[3][k]) for k in before[3])


@pytest.mark.parametrize("wrapper", [Untraceable, ReadsInputWidth])
def test_ablation_fallback_equals_split_path(tv_model, images, reruns, wrapper):
    model = tv_model("resnet18")
    wrapped = wrapper(model)
    x = images(2, 32)
    expected = fastxai.ablationcam(model, x, "layer3", batch_size=64)
    assert reruns() == 0
    # torch.fx: no split of the untraceable model; a split whose suffix reads an int otherwise
    assert (get_split(wrapped, "net.layer3") is None) == (wrapper is Untraceable)
    before = model_state(wrapped)
    got = fastxai.ablationcam(wrapped, x, "net.layer3", batch_size=64)
    assert reruns() == 2 * 256 // 64  # every channel of both images, 64 rows per run
    assert_same_state(before, model_state(wrapped))
    weights = got.extras["weights"]
    assert torch.allclose(weights, expected.extras["weights"], rtol=0, atol=1e-6)
    assert torch.allclose(got.maps, expected.maps, rtol=0, atol=1e-6)
    assert weights.abs().amax() > 1e-3 and expected.maps.std() > 0.1


def test_ablation_fallback_with_selected_channels(tv_model, images, reruns):
    """``select_channels``: only the chosen rows re-run, the others weigh 0."""
    model = tv_model("resnet18")
    x = images(2, 32)
    picked = []

    def strongest(activation: torch.Tensor) -> torch.Tensor:
        picked.append(activation.sum((2, 3)).topk(3).indices)
        return picked[-1]

    options = {"batch_size": 4, "select_channels": strongest}
    expected = fastxai.ablationcam(model, x, "layer3", **options).extras["weights"]
    got = fastxai.ablationcam(Untraceable(model), x, "net.layer3", **options).extras["weights"]
    assert reruns() == 2  # 6 rows, 4 per run
    assert torch.equal(picked[0], picked[1])
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    mask = torch.zeros_like(got, dtype=torch.bool).scatter(1, picked[1], True)
    assert (got[~mask] == 0).all() and (got[mask] != 0).all()


def smooth_cnn() -> nn.Module:
    """Smooth after the layer (tanh, softplus) and with large weights, so Shapley-CAM's Hessian
    term changes the maps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Softplus(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.5)
    return model.eval()


def test_shapley_fallback_equals_split_path(images, reruns):
    """In float64, so the two differentiations agree to rounding."""
    model = smooth_cnn().double()
    wrapped = Untraceable(model)
    x = images(2, 16).double()
    expected = fastxai.shapleycam(model, x, "2")
    before = model_state(wrapped)
    got = fastxai.shapleycam(wrapped, x, "net.2")
    assert reruns() == 1
    assert_same_state(before, model_state(wrapped))
    assert torch.allclose(got.extras["weights"], expected.extras["weights"], rtol=0, atol=1e-12)
    assert torch.allclose(got.maps, expected.maps, rtol=0, atol=1e-12)
    # the Hessian term matters here: Grad-CAM's maps differ
    assert (got.maps - fastxai.gradcam(model, x, "2").maps).abs().amax() > 0.1


class FailsAfterFirstCall(nn.Module):
    """``inner`` that runs once (the capture), then raises (inside the re-run)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("the network after the layer failed")
        return self.inner(x)


@pytest.mark.parametrize("method", ["ablationcam", "shapleycam"])
def test_model_unchanged_when_the_rerun_raises(tv_model, images, method):
    """The network after the layer raises during the re-run, with the hook in place; in
    training mode, where BatchNorm's running statistics would move if they were not kept."""
    net = copy.deepcopy(tv_model("resnet18")).train()
    net.layer4 = FailsAfterFirstCall(net.layer4)
    model = Untraceable(net)
    before = model_state(model)
    with pytest.raises(RuntimeError, match="the network after the layer failed"):
        fastxai.METHODS[method](model, images(2, 32), "net.layer3")
    assert net.layer4.calls == 2
    assert_same_state(before, model_state(model))


def test_substitution_replaces_the_chosen_call_only():
    """A module called twice: call 1 returns the given value, call 0 runs as usual; the hooks
    are gone after the block."""
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(self.block(x)) * 2

    model = Twice()
    x = torch.randn(3, 4)
    value = torch.randn(3, 4)
    with output_substituted(model, model.block, 1) as substitution:
        got = substitution.run(x, value)
    with (
        output_substituted(model, model.block, 2) as substitution,
        pytest.raises(ValueError, match="called the layer 2 time"),
    ):
        substitution.run(x, value)
    assert torch.equal(got, value * 2)
    assert not model.block._forward_hooks and not model.block._forward_pre_hooks
    assert torch.equal(model(x), model.block(model.block(x)) * 2)
