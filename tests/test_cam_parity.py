"""The CAM family against pytorch-grad-cam 1.5.7 as the oracle (max abs error on [0, 1] maps).

The gradient methods are compared with pytorch-grad-cam run in float64, within 1e-5 plus
pytorch-grad-cam's own float32 error (so the tolerance comes from the reference, not from
fastxai's output); each case checks that all-zero maps would fail it.

Layers are chosen where nothing after them modifies the output in place (pytorch-grad-cam keeps
an alias of the activation on CPU; REFERENCE_NOTES.md) and where the gradient varies spatially,
so that Grad-CAM, XGrad-CAM and Grad-CAM++ are told apart.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch

import fastxai
from fastxai import compat

pgc = pytest.importorskip("pytorch_grad_cam", reason="pip install grad-cam==1.5.7 (test extra)")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

TOLERANCE = 1e-5  # max |fastxai - pytorch-grad-cam| on maps in [0, 1]

GRADIENT_CLASSES = ["GradCAM", "GradCAMPlusPlus", "XGradCAM", "LayerCAM", "HiResCAM"]


# (model, layer): block outputs, ReLU modules, convs followed by BN, dense and inverted-residual
# blocks; none is overwritten in place afterwards.
LAYERS = [
    ("resnet18", "layer3"),
    ("resnet18", "layer4.1.conv2"),
    ("resnet50", "layer3.5"),
    ("resnet50", "layer4.2.conv3"),
    ("vgg16", "features.29"),
    ("vgg16", "features.22"),
    ("densenet121", "features.denseblock3"),
    ("densenet121", "features.transition2.conv"),
    ("mobilenet_v3_large", "features.13"),
    ("mobilenet_v3_large", "features.15"),
]


def run_pgc(cls_name, model, layer, x, targets, **call):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        reference = getattr(pgc, cls_name)(model=model, target_layers=[layer])
        return reference(input_tensor=x, targets=targets, **call)


@pytest.mark.parametrize(("model_name", "layer_name"), LAYERS)
def test_gradient_methods_match_pytorch_grad_cam(tv_model, images, model_name, layer_name):
    model = tv_model(model_name)
    x = images(2, 64)
    layer = model.get_submodule(layer_name)
    # Each image's top-1 class: with random weights other classes often give all-zero maps in
    # both libraries (MobileNetV3), a comparison that an all-zero implementation would pass.
    with torch.no_grad():
        top1 = model(x).argmax(1).tolist()
    targets = [ClassifierOutputTarget(c) for c in top1]
    model64, x64 = copy.deepcopy(model).double(), x.double()
    for cls_name in GRADIENT_CLASSES:
        expected = run_pgc(cls_name, model, layer, x, targets)
        truth = run_pgc(cls_name, model64, model64.get_submodule(layer_name), x64, targets)
        got = getattr(compat, cls_name)(model, [layer])(x, targets)
        # The tolerance comes from the reference: pytorch-grad-cam's own float32 error against
        # its float64 result (large where the raw map is tiny after cancellation), plus 1e-5.
        tolerance = TOLERANCE + np.abs(expected - truth).max(axis=(1, 2))
        error = np.abs(got - truth).max(axis=(1, 2))
        assert (error <= tolerance).all(), (
            f"{cls_name} at {model_name}.{layer_name}: {error} > {tolerance}"
        )
        assert got.dtype == np.float32 and got.shape == expected.shape
        # the comparison has power: an implementation returning zero maps would fail it
        assert (np.abs(truth).max(axis=(1, 2)) > tolerance).all(), (
            f"{cls_name} at {model_name}.{layer_name}: tolerance {tolerance} admits zero maps"
        )


def test_methods_are_distinguished_at_spatially_varying_layer(tv_model, images):
    """Guards the parity test's power: at layer3 the gradient weights differ between methods."""
    model = tv_model("resnet18")
    x = images(2, 64)
    maps = {
        name: fastxai.METHODS[name](model, x, "layer3").maps
        for name in ("gradcam", "xgradcam", "gradcampp", "layercam")
    }
    assert (maps["gradcam"] - maps["xgradcam"]).abs().max() > 1e-2
    assert (maps["gradcam"] - maps["gradcampp"]).abs().max() > 1e-2


def test_functional_equals_compat(tv_model, images):
    model = tv_model("resnet18")
    x = images(3, 64)
    functional = fastxai.gradcam(model, x, "layer3", [1, 2, 3]).maps.numpy()
    targets = [ClassifierOutputTarget(c) for c in (1, 2, 3)]
    assert np.array_equal(functional, compat.GradCAM(model, [model.layer3])(x, targets))


@pytest.mark.parametrize(
    ("model_name", "layer_names"),
    [
        ("resnet18", ["layer2", "layer3", "layer4.1"]),
        ("densenet121", ["features.denseblock2", "features.transition2.conv"]),
    ],
)
def test_multi_layer_mean_fusion_matches(tv_model, images, model_name, layer_names):
    """Several layers (one forward and one backward in fastxai) against pytorch-grad-cam's
    multi-layer maps, within 1e-5 plus pytorch-grad-cam's own float32 error."""
    model = tv_model(model_name)
    x = images(2, 64)
    layers = [model.get_submodule(name) for name in layer_names]
    model64, x64 = copy.deepcopy(model).double(), x.double()
    layers64 = [model64.get_submodule(name) for name in layer_names]
    for cls_name in GRADIENT_CLASSES:
        expected = run_pgc_layers(cls_name, model, layers, x)
        truth = run_pgc_layers(cls_name, model64, layers64, x64)
        got = getattr(compat, cls_name)(model, layers)(x, None)
        tolerance = TOLERANCE + np.abs(expected - truth).max(axis=(1, 2))
        error = np.abs(got - truth).max(axis=(1, 2))
        assert (error <= tolerance).all(), f"{cls_name} at {layer_names}: {error} > {tolerance}"
        assert (np.abs(truth).max(axis=(1, 2)) > tolerance).all()


def run_pgc_layers(cls_name, model, layers, x, **call):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return getattr(pgc, cls_name)(model=model, target_layers=layers)(x, None, **call)


def test_aug_smooth_matches(tv_model, images):
    model = tv_model("resnet18")
    x = images(2, 64)
    expected = run_pgc_layers("GradCAM", model, [model.layer3], x, aug_smooth=True)
    got = compat.GradCAM(model, [model.layer3])(x, None, aug_smooth=True)
    assert np.abs(got - expected).max() <= TOLERANCE


@pytest.mark.parametrize("cls_name", ["GradCAM", "LayerCAM", "HiResCAM", "EigenCAM"])
def test_eigen_projection_matches_up_to_sign(tv_model, images, cls_name):
    """The SVD sign is arbitrary: each image equals pytorch-grad-cam's map for one of the signs."""
    model = tv_model("resnet18")
    x = images(2, 64)
    layer = model.layer3
    expected = run_pgc(cls_name, model, layer, x, None, eigen_smooth=True)
    explainer = getattr(compat, cls_name)(model, [layer])
    got = explainer(x, None, eigen_smooth=True)
    raw = getattr(fastxai, cls_name.lower())(model, x, "layer3", eigen_smooth=True).raw
    flipped = fastxai.ops.scale_maps(-raw, (64, 64)).numpy()
    for n in range(2):
        error = min(np.abs(got[n] - expected[n]).max(), np.abs(flipped[n] - expected[n]).max())
        assert error <= 1e-4, f"{cls_name} image {n}: {error:.2e}"


def test_scorecam_matches(tv_model, images):
    model = tv_model("resnet18")
    x = images(2, 48)
    layer = model.layer4
    expected = run_pgc("ScoreCAM", model, layer, x, None)
    got = compat.ScoreCAM(model, [layer])(x, None)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_ablationcam_matches_at_post_relu_layer(tv_model, images):
    model = tv_model("resnet18")
    x = images(2, 48)
    for layer in (model.layer4, model.layer3):  # block outputs end in a ReLU: min is 0
        expected = run_pgc("AblationCAM", model, layer, x, None)
        got = compat.AblationCAM(model, [layer])(x, None)
        assert np.abs(got - expected).max() <= TOLERANCE


def test_cam_equals_gradcam_for_gap_linear_head(tv_model, images):
    model = tv_model("resnet18")
    x = images(2, 64)
    cam = fastxai.cam(model, x, "layer4", [5, 6])
    grad = fastxai.gradcam(model, x, "layer4", [5, 6])
    assert torch.allclose(cam.maps, grad.maps, atol=1e-5)
    assert torch.equal(cam.extras["weights"], model.fc.weight[[5, 6]])


def test_layercam_tanh_fusion_follows_formula(tv_model, images):
    model = tv_model("resnet18")
    x = images(2, 64)
    layers = ["layer2", "layer3"]
    fused = fastxai.layercam(model, x, layers, fusion="tanh").maps
    per_layer = [fastxai.layercam(model, x, name).maps for name in layers]
    scaled = torch.stack(
        [torch.tanh(2 * m / m.flatten(1).amax(1)[:, None, None]) for m in per_layer]
    ).amax(0)
    expected = fastxai.ops.reference.minmax(scaled)
    assert torch.allclose(fused, expected, atol=1e-6)
