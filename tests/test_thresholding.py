"""Threshold fine-tuning against an independent one-image-one-threshold-at-a-time reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastxai
from fastxai.thresholding import naive_threshold, percentile_masks


def small_cnn(seed: int = 0, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    ).eval()


@torch.no_grad()
def reference_tft(model, x, maps, classes, thresholds, soft=False):
    """The TFT paper's Alg. 1, written out per image and per threshold."""
    taus, rpis, masks, probabilities = [], [], [], []
    for n in range(x.shape[0]):
        c = int(classes[n])
        y = torch.softmax(model(x[n : n + 1]), 1)[0, c]
        curve, probability = [], []
        for tau in thresholds:
            keep = (maps[n] >= tau) & (maps[n] > 0)
            factor = maps[n] * keep if soft else keep.float()
            y_hat = torch.softmax(model(x[n : n + 1] * factor), 1)[0, c]
            curve.append(float(torch.clamp(y_hat - y, min=0) / y))
            probability.append(float(y_hat))
        best = max(range(len(curve)), key=lambda i: (curve[i], -i))
        if curve[best] > 0:
            taus.append(thresholds[best])
            masks.append((maps[n] >= thresholds[best]) & (maps[n] > 0))
        else:
            taus.append(0.0)
            masks.append(maps[n] > 0)
        rpis.append(curve)
        probabilities.append(probability)
    return torch.tensor(taus), torch.tensor(rpis), torch.stack(masks), torch.tensor(probabilities)


@pytest.mark.parametrize("soft", [False, True])
def test_tft_matches_reference_on_random_inputs(soft):
    model = small_cnn()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(4, 3, 12, 12, generator=g)
        maps = torch.rand(4, 12, 12, generator=g)
        maps[0, :6] = 0  # exact zeros stay muted at tau = 0
        classes = torch.randint(0, 5, (4,), generator=g)
        result = fastxai.tft(model, x, maps, classes, mask="soft" if soft else "binary")
        thresholds = [i / 10 for i in range(10)]
        tau, rpi, mask, probability = reference_tft(model, x, maps, classes, thresholds, soft)
        assert torch.allclose(result.rpi.double(), rpi.double(), atol=1e-5)
        # One image at a time vs the batch: float32 forwards agree to ~1e-7 in a probability.
        assert torch.allclose(
            result.extras["probabilities"].double(), probability.double(), atol=1e-6
        )
        assert torch.allclose(result.tau.double(), tau.double())
        assert torch.equal(result.mask, mask)
        assert torch.equal(result.maps, maps * mask)


def test_ties_pick_first_threshold_and_zero_rpi_mutes_nothing():
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    maps = torch.full((2, 8, 8), 0.95)  # every threshold keeps every pixel: identical candidates
    maps[1] = 0.0  # all-zero map: every candidate is the all-zero image
    result = fastxai.tft(model, x, maps, [0, 1])
    assert torch.equal(result.rpi[0], result.rpi[0, :1].expand(10))
    assert result.tau.tolist() == [0.0, 0.0]  # first of the ties, or no muting
    assert result.mask[0].all() and not result.mask[1].any()


def test_percentile_mode_mutes_exact_counts_with_stable_ties():
    maps = torch.tensor([[[0.5, 0.1, 0.5], [0.1, 0.9, 0.5]]])  # ties at 0.1 and 0.5
    fractions = torch.tensor([0.1, 0.34, 0.5, 0.9])
    masks = percentile_masks(maps, fractions)
    hw = 6
    for t, q in enumerate(fractions.tolist()):
        assert int((~masks[0, t]).sum()) == math.floor(q * hw)
    # 50% = 3 pixels: both 0.1s, then the first 0.5 in row-major order
    assert masks[0, 2].flatten().tolist() == [False, False, True, False, True, True]


def test_batched_equals_sequential_and_chunked():
    model = small_cnn(seed=3)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 10, 10, generator=g)
    maps = torch.rand(3, 10, 10, generator=g)
    batched = fastxai.tft(model, x, maps, batch_size=7)
    for n in range(3):
        single = fastxai.tft(model, x[n : n + 1], maps[n : n + 1])
        assert torch.allclose(batched.rpi[n], single.rpi[0], atol=1e-6)
        assert torch.equal(batched.mask[n], single.mask[0])


def test_gradcam_tft_flag_and_bad_arguments(tv_model, images):
    model = tv_model("resnet18")
    x = images(2, 32)
    plain = fastxai.gradcam(model, x, "layer3")
    tuned = fastxai.gradcam(model, x, "layer3", tft=True)
    direct = fastxai.tft(model, x, plain.maps, plain.targets)
    assert torch.equal(tuned.mask, direct.mask) and torch.equal(tuned.tau, direct.tau)
    assert torch.equal(tuned.raw, plain.raw)
    with pytest.raises(ValueError, match=r"maps must have shape \(2, 32, 32\)"):
        fastxai.tft(model, x, plain.maps[:1])
    with pytest.raises(ValueError, match=r"maps must lie in \[0, 1\]"):
        fastxai.tft(model, x, plain.maps * 2)
    with pytest.raises(ValueError, match="thresholds must lie in"):
        fastxai.tft(model, x, plain.maps, thresholds=[0.5, 1.5])
    with pytest.raises(ValueError, match="mode must be"):
        fastxai.tft(model, x, plain.maps, mode="otsu")
    assert naive_threshold("gradcampp") == 0.5
    with pytest.raises(ValueError, match="method: no naive threshold"):
        naive_threshold("eigencam")


class _OpLog(TorchDispatchMode):
    """The ops a call dispatches, with the shapes of the softmaxes' inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.softmax_shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops.append(name)
        if name == "aten::_softmax":
            self.softmax_shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def pooled_cnn(seed: int = 0, classes: int = 5) -> nn.Module:
    """A CNN whose second conv sees half the input resolution (its maps are upsampled)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    ).eval()


@pytest.mark.parametrize("soft", [False, True])
def test_gradcam_tft_runs_one_ladder_op_and_matches_the_per_threshold_reference(soft):
    model = pooled_cnn(seed=2)
    x = torch.randn(3, 3, 14, 14, generator=torch.Generator().manual_seed(4))
    options = {"mask": "soft" if soft else "binary"}
    with _OpLog() as log:
        tuned = fastxai.gradcam(model, x, "3", tft=True, tft_options=options)
    plain = fastxai.gradcam(model, x, "3")
    thresholds = [i / 10 for i in range(10)]
    tau, rpi, mask, probability = reference_tft(
        model, x, plain.maps, plain.targets, thresholds, soft
    )
    # The ladder op's map is the scale_maps kernel's formula (1e-6: float32 reassociation).
    torch.testing.assert_close(tuned.extras["original_maps"], plain.maps, atol=1e-6, rtol=0)
    assert torch.allclose(tuned.rpi.double(), rpi.double(), atol=1e-5)
    assert torch.allclose(tuned.extras["probabilities"].double(), probability.double(), atol=1e-6)
    assert torch.equal(tuned.tau.float(), tau.float()) and torch.equal(tuned.mask, mask)
    assert (tuned.tau > 0).any(), "some threshold should raise a probability here"
    if fastxai.ops.has_extension():
        assert "fastxai::tft_ladder" in log.ops and "fastxai::rpi_select" in log.ops
        assert "fastxai::scale_maps" not in log.ops and "fastxai::tft_mask" not in log.ops
    # The only softmax is over the N original logits, never over the N * T ladder rows.
    assert log.softmax_shapes == [(3, 5)]


def test_several_layers_tft_runs_the_maps_ladder_and_matches_tft_on_the_maps():
    model = pooled_cnn(seed=5)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    layers = ["0", "3"]
    options = {"mode": "percentile"}
    tuned = fastxai.gradcam(model, x, layers, tft=True, tft_options=options)
    plain = fastxai.gradcam(model, x, layers)
    direct = fastxai.tft(model, x, plain.maps, plain.targets, **options)
    assert torch.equal(tuned.mask, direct.mask) and torch.equal(tuned.tau, direct.tau)
    assert len(tuned.extras["raw_per_layer"]) == 2
