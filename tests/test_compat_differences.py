"""Each deliberate difference from pytorch-grad-cam warns once, pointing at the caller."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastxai._checks
from fastxai import compat


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(fastxai._checks, "_WARNED_ONCE", set())


@pytest.mark.parametrize(
    ("make", "call", "message"),
    [
        (compat.EigenCAM, {}, "sign is fixed"),
        (compat.EigenGradCAM, {}, "sign is fixed"),
        (compat.GradCAM, {"eigen_smooth": True}, "sign is fixed"),
        (compat.GradCAM, {"targets": "one"}, "explains only the first image"),
    ],
)
def test_a_deliberate_difference_warns_once(make, call, message):
    model = small_net()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    call = dict(call)
    if call.get("targets") == "one":
        call["targets"] = [compat.utils.model_targets.ClassifierOutputTarget(1)]
    cam = make(model, [model[0]])
    with pytest.warns(UserWarning, match=message) as record:
        cam(x, **call)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cam(x, **call)  # the second call is silent


def test_no_warning_where_fastxai_equals_pytorch_grad_cam():
    model = small_net()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.GradCAM(model, [model[0]])(x, None)
