"""Metrics against their formulas written out per image; the nn.Explainer wrapper."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastxai
from fastxai.metrics import average_increase_drop, deletion_insertion, mute_lowest
from fastxai.nn import Explainer


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    ).eval()


@torch.no_grad()
def prob(model, image, c):
    return float(torch.softmax(model(image[None]), 1)[0, c])


@pytest.mark.parametrize("mask", ["binary", "soft"])
def test_average_increase_drop_follows_formula(mask):
    model = small_cnn()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 10, 10, generator=g)
    maps = torch.rand(6, 10, 10, generator=g) * (torch.rand(6, 10, 10, generator=g) > 0.5)
    result = average_increase_drop(model, x, maps, mask=mask, batch_size=4)
    classes = model(x).argmax(1)
    increases, drops = [], []
    for n in range(6):
        c = int(classes[n])
        factor = (maps[n] > 0).float() if mask == "binary" else maps[n]
        y, y_hat = prob(model, x[n], c), prob(model, x[n] * factor, c)
        increases.append(y_hat > y)
        drops.append(max(y - y_hat, 0) / y)
    assert result.increase.tolist() == increases
    assert torch.allclose(result.drop, torch.tensor(drops), atol=1e-6)
    assert math.isclose(result.average_increase, sum(increases) / 6)
    assert math.isclose(result.average_drop, sum(drops) / 6, rel_tol=1e-5)


def test_mute_lowest_matches_table1_fraction():
    maps = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1))
    muted = mute_lowest(maps, 0.85)
    assert ((muted == 0).sum((1, 2)) == math.floor(0.85 * 64)).all()
    kept = muted > 0
    assert (maps[kept].min() >= maps[~kept].max()) if kept.any() else True


def test_deletion_insertion_follow_formula():
    model = small_cnn(seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, generator=g)
    maps = torch.rand(2, 6, 6, generator=g)
    steps = 4
    result = deletion_insertion(model, x, maps, [1, 2], steps=steps, batch_size=3)
    for n, c in enumerate([1, 2]):
        order = sorted(range(36), key=lambda i: (-float(maps[n].flatten()[i]), i))
        deletion, insertion = [], []
        for s in range(steps + 1):
            k = math.ceil(s * 36 / steps)
            reveal = torch.zeros(36)
            reveal[order[:k]] = 1
            reveal = reveal.view(6, 6)
            deletion.append(prob(model, x[n] * (1 - reveal), c))
            insertion.append(prob(model, x[n] * reveal, c))
        assert torch.allclose(result.deletion[n], torch.tensor(deletion), atol=1e-6)
        assert torch.allclose(result.insertion[n], torch.tensor(insertion), atol=1e-6)
        area = sum((deletion[i] + deletion[i + 1]) / 2 for i in range(steps)) / steps
        assert math.isclose(float(result.deletion_auc[n]), area, rel_tol=1e-5)


def test_metrics_reject_bad_maps():
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"maps must have shape \(2, 8, 8\)"):
        average_increase_drop(model, x, torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="maps contains NaN"):
        deletion_insertion(model, x, torch.full((2, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        deletion_insertion(model, x, torch.rand(2, 8, 8), steps=0)


def test_explainer_module_returns_logits_and_explanation(tv_model, images):
    model = tv_model("resnet18")
    x = images(2, 32)
    explainer = Explainer(model, "layer3", method="layercam")
    logits, explanation = explainer(x, [3, 4])
    expected = fastxai.layercam(model, x, "layer3", [3, 4])
    assert torch.equal(explanation.maps, expected.maps)
    assert torch.allclose(logits, model(x), atol=1e-5)
    assert explainer.model is model and not model.training
    with pytest.raises(ValueError, match="method must be one of"):
        Explainer(model, "layer3", method="gradcam3")
