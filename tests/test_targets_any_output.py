"""Models whose output is not (N, K) logits, explained through pytorch-grad-cam style target
callables; fastxai's target classes score as pytorch-grad-cam's do."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torchvision
from conftest import randomise_batchnorm
from torch import Tensor, nn

import fastxai
from fastxai import compat
from fastxai.compat.utils import model_targets as ours

pgc = pytest.importorskip("pytorch_grad_cam")
theirs = pytest.importorskip("pytorch_grad_cam.utils.model_targets")


def test_target_classes_score_as_pytorch_grad_cams() -> None:
    g = torch.Generator().manual_seed(0)
    vector, rows = torch.randn(10, generator=g), torch.randn(4, 10, generator=g)
    mask = (torch.rand(6, 7, generator=g) > 0.5).numpy().astype(np.float32)
    segmentation = torch.randn(3, 6, 7, generator=g)
    cases = [
        ("ClassifierOutputTarget", (3,), [vector, rows]),
        ("ClassifierOutputSoftmaxTarget", (3,), [vector, rows]),
        ("ClassifierOutputReST", (3,), [vector, rows]),
        ("BinaryClassifierOutputTarget", (0,), [vector[0], rows[:, 0]]),
        ("BinaryClassifierOutputTarget", (1,), [vector[0], rows[:, 0]]),
        ("SoftmaxOutputTarget", (), [vector, rows]),
        ("FinerWeightedTarget", (3, [1, 5, 7], 0.6), [vector, rows]),
        ("RawScoresOutputTarget", (), [vector, rows]),
        ("SemanticSegmentationTarget", (2, mask), [segmentation]),
    ]
    for name, args, outputs in cases:
        for output in outputs:
            expected = getattr(theirs, name)(*args)(output)
            got = getattr(ours, name)(*args)(output)
            torch.testing.assert_close(got, expected, msg=lambda m, n=name: f"{n}: {m}")
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 40], [0, 0, 9, 11]])
    detections = {"boxes": boxes, "labels": torch.tensor([1, 2, 3]), "scores": torch.rand(3)}
    for labels, references in [([1, 2], boxes[:2] + 1), ([3, 2], boxes[[0, 1]]), ([5], boxes[:1])]:
        args = (labels, references.numpy(), 0.5)
        expected = theirs.FasterRCNNBoxScoreTarget(*args)(detections)
        torch.testing.assert_close(
            ours.FasterRCNNBoxScoreTarget(*args)(detections).reshape(1), expected
        )


class SegmentationOutput(nn.Module):
    """pytorch-grad-cam's tutorial wrapper: a torchvision segmentation model's ``out``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["out"]


def segmentation_model() -> nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3
    )
    with torch.no_grad():
        randomise_batchnorm(net, torch.Generator().manual_seed(1))
    return SegmentationOutput(net).eval()


def test_segmentation_gradcam_matches_pytorch_grad_cam() -> None:
    model = segmentation_model()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predicted = model(x).argmax(1)[0]
    category = int(predicted.flatten().mode().values)
    mask = (predicted == category).float()
    mask[48:] = 0  # the class's pixels in the top half
    mask = mask.numpy()
    targets = [ours.SemanticSegmentationTarget(category, mask)] * 2
    layer = model.model.backbone["16"]
    got = compat.GradCAM(model, [layer])(x, targets)
    native = fastxai.gradcam(model, x, "model.backbone.16", targets).maps.numpy()
    np.testing.assert_array_equal(got, native)

    def pgc_maps(net: nn.Module, images: Tensor, pgc_targets: list) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pgc.GradCAM(net, [net.model.backbone["16"]])(images, pgc_targets)

    reference32 = pgc_maps(
        copy.deepcopy(model), x, [theirs.SemanticSegmentationTarget(category, mask)]
    )
    # pytorch-grad-cam only explains the first image for a single target: compare image 0
    reference64 = pgc_maps(
        copy.deepcopy(model).double(),
        x.double(),
        [theirs.SemanticSegmentationTarget(category, mask.astype(np.float64))],
    )
    tolerance = 10 * float(np.abs(reference32[0] - reference64[0]).max()) + 1e-6
    assert float(np.abs(got[0] - reference64[0]).max()) <= tolerance
    assert float(got[0].max()) == pytest.approx(1.0) and float(got[0].std()) > 0.05


def test_non_logit_outputs_need_callables() -> None:
    model = segmentation_model()
    x = torch.randn(1, 3, 64, 64)
    for targets in (None, 1, [1], torch.tensor([1]), [ours.ClassifierOutputTarget(1)]):
        with pytest.raises(ValueError, match=r"returns \(1, 3, 64, 64\), not \(N, num_classes\)"):
            fastxai.gradcam(model, x, "model.backbone.16", targets)
    with pytest.raises(
        ValueError,
        match=r"shape \(2, \.\.\.\), or a list of 2 per-image outputs, got \(1, 5\)",
    ):
        fastxai.gradcam(BatchOfOne(), torch.randn(2, 3, 16, 16), "conv", [0, 0])


class BatchOfOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x).mean((0, 2, 3))[None]


class BinaryNet(nn.Module):
    """A binary classifier with one output per image, ``(N,)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))[:, 0]


def test_binary_classifier_output_matches_pytorch_grad_cam() -> None:
    model = BinaryNet().eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    for category in (0, 1):
        targets = [ours.BinaryClassifierOutputTarget(category)] * 3
        got = compat.GradCAM(model, [model.features])(x, targets)
        expected = pgc.GradCAM(model, [model.features])(
            x, [theirs.BinaryClassifierOutputTarget(category)] * 3
        )
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert float(np.abs(got).max()) > 0.5
