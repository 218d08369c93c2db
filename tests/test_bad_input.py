"""Every public function rejects malformed input with an error that names the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fastxai
from fastxai import compat

PUBLIC = sorted(fastxai.METHODS)


@pytest.fixture
def model(tv_model):
    return tv_model("resnet18")


@pytest.mark.parametrize("method", PUBLIC)
@pytest.mark.parametrize(
    ("make_x", "layer", "targets", "error", "message"),
    [
        (lambda: torch.randn(3, 32, 32), "layer4", None, ValueError, r"x must have shape"),
        (lambda: torch.randn(1, 1, 3, 32, 32), "layer4", None, ValueError, r"x must have shape"),
        (
            lambda: torch.ones(1, 3, 32, 32, dtype=torch.long),
            "layer4",
            None,
            TypeError,
            r"x must be a floating tensor",
        ),
        (
            lambda: np.zeros((1, 3, 32, 32), np.float32),
            "layer4",
            None,
            TypeError,
            r"x must be a torch.Tensor",
        ),
        (
            lambda: torch.full((1, 3, 32, 32), float("nan")),
            "layer4",
            None,
            ValueError,
            r"x contains NaN or Inf",
        ),
        (
            lambda: torch.full((1, 3, 32, 32), float("inf")),
            "layer4",
            None,
            ValueError,
            r"x contains NaN or Inf",
        ),
        (
            lambda: torch.randn(1, 3, 32, 32),
            "layer5",
            None,
            ValueError,
            r"layer 'layer5' is not a submodule.*close matches: layer",
        ),
        (
            lambda: torch.randn(1, 3, 32, 32),
            nn.Conv2d(3, 3, 1),
            None,
            ValueError,
            r"layer: the module Conv2d is not a submodule",
        ),
        (
            lambda: torch.randn(1, 3, 32, 32),
            "layer4",
            1000,
            ValueError,
            r"targets: class 1000 is outside \[0, 1000\)",
        ),
        (
            lambda: torch.randn(1, 3, 32, 32),
            "layer4",
            -1,
            ValueError,
            r"targets: class -1 is outside",
        ),
        (
            lambda: torch.randn(3, 3, 32, 32),
            "layer4",
            [1, 2],
            ValueError,
            r"targets has 2 entries for a batch of 3 images",
        ),
        (
            lambda: torch.randn(1, 3, 32, 32),
            "layer4",
            torch.tensor([0.5]),
            ValueError,
            r"targets: expected an integer tensor",
        ),
        (lambda: torch.randn(1, 3, 32, 32), "layer4", "cat", TypeError, r"targets"),
        (lambda: torch.randn(1, 3, 32, 32), [], None, ValueError, r"layer: expected"),
    ],
)
def test_malformed_input(model, method, make_x, layer, targets, error, message):
    with pytest.raises(error, match=message):
        fastxai.METHODS[method](model, make_x(), layer, targets)


def test_wrong_device_is_named(model):
    if not torch.cuda.is_available():
        meta_x = torch.randn(1, 3, 32, 32, device="meta")
        with pytest.raises(ValueError, match=r"x is on meta but the model's parameters are on cpu"):
            fastxai.gradcam(model, meta_x, "layer4")
    else:
        with pytest.raises(ValueError, match=r"x is on cuda"):
            fastxai.gradcam(model, torch.randn(1, 3, 32, 32, device="cuda"), "layer4")


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return {"out": self.conv(x).mean((2, 3))}


def test_model_must_be_module_and_return_logits(images):
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        fastxai.gradcam(lambda t: t, images(1, 16), "layer4")
    features_only = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with pytest.raises(ValueError, match=r"\(1, 4, 14, 14\), not \(N, num_classes\) logits"):
        fastxai.gradcam(features_only, images(1, 16), "0")  # no callable targets
    with pytest.raises(
        ValueError,
        match=r"one row per image, shape \(1, \.\.\.\), or a list of 1 per-image outputs, got dict",
    ):
        fastxai.gradcam(DictOutput(), images(1, 16), "conv")


def test_bad_fusion_and_compat_arguments(model, images):
    with pytest.raises(ValueError, match="fusion must be 'mean' or 'tanh'"):
        fastxai.layercam(model, images(1, 32), ["layer3", "layer4"], fusion="max")
    with pytest.raises(ValueError, match="target_layers must be a non-empty list"):
        compat.GradCAM(model, model.layer4)
    with pytest.raises(ValueError, match="ratio_channels_to_ablate"):
        compat.AblationCAM(model, [model.layer4], ratio_channels_to_ablate=1.5)


def test_cam_needs_linear_head_and_class_targets(model, images):
    with pytest.raises(ValueError, match="targets: CAM explains class indices"):
        fastxai.cam(model, images(1, 32), "layer4", lambda o: o[0])
    with pytest.raises(ValueError, match="layer: CAM needs a linear head"):
        fastxai.cam(model, images(1, 32), "layer3")


def test_training_mode_warns_once_and_mode_is_kept(images):
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    assert net.training
    with pytest.warns(UserWarning, match="training mode"):
        fastxai.gradcam(net, images(2, 16), "0")
    assert net.training
