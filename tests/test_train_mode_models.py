"""Train-mode torchvision models at every layer: no method crashes and no buffer changes.

resnet18, densenet121 and efficientnet_b0 (random weights, BatchNorm running statistics set away
from the batch's) stay in training mode. Every module whose output is a 4-D feature map is explained
by a gradient method, the five taking turns (resnet18: every such layer; the two larger models:
every fourth, each layer kind included); the perturbation methods run on a small network 100 times
each. After all calls every buffer equals its value before, bit for bit, and the model is still in
training mode.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import Tensor, nn

import fastxai

GRADIENT_METHODS = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam"]


def train_mode(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.train()


def feature_map_layers(model: nn.Module, x: Tensor) -> list[str]:
    """Modules whose (first) output is an ``(N, C, h, w)`` tensor, in call order."""
    names = {m: n for n, m in model.named_modules() if n}
    found: list[str] = []

    def keep(module: nn.Module, _inputs: object, output: object) -> None:
        name = names[module]
        if isinstance(output, Tensor) and output.dim() == 4 and name not in found:
            found.append(name)

    handles = [m.register_forward_hook(keep) for m in names]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
        model.train()
    return found


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


def assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    changed = [n for n, b in model.named_buffers() if not torch.equal(b, before[n])]
    assert not changed, f"{len(changed)} buffers changed, e.g. {changed[:3]}"
    assert all(m.training for m in model.modules())


def every_kind(model: nn.Module, layers: list[str], stride: int) -> list[str]:
    """Every ``stride``-th layer, plus the first layer of each module type the stride skipped."""
    chosen = layers[::stride]
    kinds = {type(model.get_submodule(n)) for n in chosen}
    for name in layers:
        kind = type(model.get_submodule(name))
        if kind not in kinds:
            kinds.add(kind)
            chosen.append(name)
    return chosen


@pytest.mark.parametrize(
    ("name", "stride"), [("resnet18", 1), ("densenet121", 6), ("efficientnet_b0", 4)]
)
def test_gradient_methods_at_every_layer_of_a_train_mode_model(name: str, stride: int) -> None:
    model = train_mode(getattr(torchvision.models, name)(num_classes=10))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    chosen = every_kind(model, feature_map_layers(model, x), stride)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the training-mode and 1 x 1 map warnings
        for i, layer in enumerate(chosen):  # the methods take turns: each meets every depth
            method = GRADIENT_METHODS[i % len(GRADIENT_METHODS)]
            explanation = getattr(fastxai, method)(model, x, layer, [3, 8])
            assert torch.isfinite(explanation.maps).all(), (method, layer)
    assert_unchanged(model, before)


class SmallBatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize("method", sorted(fastxai.METHODS))
def test_one_hundred_calls_of_each_method_change_no_buffer(method: str) -> None:
    model = train_mode(SmallBatchNormNet())
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    before = snapshot(model)
    explain = fastxai.METHODS[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call in range(100):
            explain(model, x, "features.3", [call % 4, (call + 1) % 4])
    assert_unchanged(model, before)
