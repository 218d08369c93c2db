"""compat.AblationCAM's options against pytorch-grad-cam 1.5.7: ``ratio_channels_to_ablate``,
``reshape_transform`` with token outputs and the ablation layer objects.

Maps are compared within 1e-5 (as the Ablation-CAM parity in ``test_cam_parity.py``). fastxai
zeroes an ablated channel; pytorch-grad-cam uses ``min - 1e7`` where the layer output has no
zero minimum (a ViT's LayerNorm output), so there the reference is pytorch-grad-cam's own
``AblationLayerVit`` with only its ablation value set to 0.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from conftest import Untraceable
from torchvision.models.vision_transformer import VisionTransformer

from fastxai import compat
from fastxai.compat.ablation_layer import AblationLayer, AblationLayerVit
from fastxai.compat.utils.reshape_transforms import vit_reshape_transform

pgc = pytest.importorskip("pytorch_grad_cam", reason="pip install grad-cam==1.5.7 (test extra)")
from pytorch_grad_cam import ablation_layer as ref_ablation_layer  # noqa: E402

TOLERANCE = 1e-5


def quiet(function):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function()


def run_pgc(model, layer, x, **options):
    return quiet(lambda: pgc.AblationCAM(model, [layer], **options)(x, None))


class ZeroAblationLayerVit(ref_ablation_layer.AblationLayerVit):
    """pytorch-grad-cam's ViT ablation with the ablated value 0 (the paper's and fastxai's)."""

    def __call__(self, x):
        output = self.activations.transpose(1, -1)
        for i in range(output.size(0)):
            output[i, self.indices[i], :] = 0
        return output.transpose(-1, 1)


def tiny_vit() -> torch.nn.Module:
    """A 2-block ViT on 32 x 32 images (4 x 4 patches + class token, 32 channels); torchvision
    initialises the head to 0, which would make every score 0."""
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)
    return model.eval()


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    return vit_reshape_transform(tokens, 4, 4)


@pytest.mark.parametrize("ratio", [0.25, 0.1])
def test_ratio_channels_to_ablate_matches(tv_model, images, ratio):
    """resnet18 layer3 ends in a ReLU (minimum 0), so both ablate to 0."""
    model = tv_model("resnet18")
    x = images(2, 64)
    got = compat.AblationCAM(model, [model.layer3], ratio_channels_to_ablate=ratio)(x)
    expected = run_pgc(model, model.layer3, x, ratio_channels_to_ablate=ratio)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert (expected.max(axis=(1, 2)) - expected.min(axis=(1, 2)) > 0.5).all()
    # the selection matters: ablating every channel gives other maps
    assert np.abs(got - compat.AblationCAM(model, [model.layer3])(x)).max() > 0.1


def test_selection_is_pytorch_grad_cams(tv_model, images):
    """The chosen channels themselves, including the order among the many equal shares."""
    model = tv_model("resnet18")
    kept = {}
    handle = model.layer3.register_forward_hook(lambda m, i, o: kept.update(a=o.detach()))
    try:
        with torch.no_grad():
            model(images(2, 64))
    finally:
        handle.remove()
    for activation in kept["a"].numpy():
        for ratio in (0.25, 0.4):
            with np.errstate(invalid="ignore"):
                expected = ref_ablation_layer.AblationLayer().activations_to_be_ablated(
                    activation, ratio
                )
            got = AblationLayer().activations_to_be_ablated(activation, ratio)
            assert got.dtype == np.int32 and np.array_equal(got, expected), ratio


def test_ratio_above_half_ablates_every_channel(tv_model, images):
    """Above 0.5 the most and least covering halves overlap: every channel is ablated, as with
    pytorch-grad-cam's ratio 1 (pytorch-grad-cam 1.5.7 ablates the overlap twice and then
    weighs no channel after the first one it ablated twice)."""
    model = tv_model("resnet18")
    x = images(2, 48)
    got = compat.AblationCAM(model, [model.layer3], ratio_channels_to_ablate=0.75)(x)
    expected = run_pgc(model, model.layer3, x)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert expected.std() > 0.1


@pytest.mark.parametrize("ratio", [1.0, 0.25])
def test_vit_tokens_match(images, ratio):
    model = tiny_vit()
    x = images(2, 32)
    layer = model.encoder.layers.encoder_layer_1.ln_1
    expected = run_pgc(
        model,
        layer,
        x,
        reshape_transform=tokens_to_grid,
        ablation_layer=ZeroAblationLayerVit(),
        ratio_channels_to_ablate=ratio,
    )
    assert (expected.max(axis=(1, 2)) - expected.min(axis=(1, 2)) > 0.5).all()
    for ablation_layer in (AblationLayerVit(), ref_ablation_layer.AblationLayerVit(), None):
        got = compat.AblationCAM(
            model,
            [layer],
            reshape_transform=tokens_to_grid,
            ablation_layer=ablation_layer,
            ratio_channels_to_ablate=ratio,
        )(x)
        assert np.abs(got - expected).max() <= TOLERANCE, type(ablation_layer)
    # the same through the whole-model re-run (a model torch.fx cannot trace)
    got = compat.AblationCAM(
        Untraceable(model),
        [layer],
        reshape_transform=tokens_to_grid,
        ablation_layer=AblationLayerVit(),
        ratio_channels_to_ablate=ratio,
    )(x)
    assert np.abs(got - expected).max() <= TOLERANCE
    # the ablation value matters here: pytorch-grad-cam's own min - 1e7 gives other maps
    big = run_pgc(
        model,
        layer,
        x,
        reshape_transform=tokens_to_grid,
        ablation_layer=ref_ablation_layer.AblationLayerVit(),
        ratio_channels_to_ablate=ratio,
    )
    assert np.abs(big - expected).max() > 0.1


def test_bad_ablation_options(tv_model, images):
    model = tv_model("resnet18")
    with pytest.raises(ValueError, match="ablation_layer: expected AblationLayer"):
        compat.AblationCAM(model, [model.layer4], ablation_layer=torch.nn.Identity())
    with pytest.raises(ValueError, match=r"ratio_channels_to_ablate must be in \[0, 1\]"):
        compat.AblationCAM(model, [model.layer4], ratio_channels_to_ablate=1.5)
    vit = tiny_vit()
    layer = vit.encoder.layers.encoder_layer_1.ln_1
    cam = compat.AblationCAM(
        vit, [layer], reshape_transform=tokens_to_grid, ablation_layer=AblationLayer()
    )
    with pytest.raises(ValueError, match=r"channel_axis: axis 1 of the layer output \(2, 17, 32\)"):
        cam(images(2, 32))
    assert all(not m.training for m in vit.modules())
    assert all(p.grad is None for p in vit.parameters())
