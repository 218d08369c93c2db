"""``svd_sign="numpy"``: Eigen-CAM, Eigen-Grad-CAM and ``eigen_smooth`` with pytorch-grad-cam's
principal-component sign, so the maps equal pytorch-grad-cam 1.5.7's.

pytorch-grad-cam's float32 map is the reference here (its sign is that of its own float32 SVD;
its float64 run can take the other sign), within 1e-5. Each case also checks that the default
sign (largest-magnitude value positive) gives another map for some image, so the option is what
makes the maps equal.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest

import fastxai
import fastxai._checks
from fastxai import compat

pgc = pytest.importorskip("pytorch_grad_cam", reason="pip install grad-cam==1.5.7 (test extra)")

TOLERANCE = 1e-5

CASES = [
    ("EigenCAM", "resnet18", "layer2", {}),
    ("EigenGradCAM", "resnet18", "layer3", {}),
    ("GradCAM", "resnet18", "layer3", {"eigen_smooth": True}),
    ("EigenCAM", "efficientnet_b0", "features.6", {}),
]


def quiet(function):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function()


@pytest.mark.parametrize(("name", "model_name", "layer_name", "call"), CASES)
def test_numpy_sign_equals_pytorch_grad_cam(tv_model, images, name, model_name, layer_name, call):
    model = tv_model(model_name)
    x = images(4, 64)
    layer = model.get_submodule(layer_name)
    got = getattr(compat, name)(model, [layer], svd_sign="numpy")(x, **call)
    expected = quiet(lambda: getattr(pgc, name)(model, [layer])(x, None, **call))
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE
    assert (expected.max(axis=(1, 2)) - expected.min(axis=(1, 2)) > 0.5).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = getattr(compat, name)(model, [layer])(x, **call)
    assert np.abs(default - expected).max() > 0.1, "the default sign should differ somewhere"


def test_functional_option_equals_the_class(tv_model, images):
    model = tv_model("resnet18")
    x = images(4, 64)
    got = fastxai.eigengradcam(model, x, "layer3", svd_sign="numpy").maps.numpy()
    assert np.array_equal(got, compat.EigenGradCAM(model, [model.layer3], svd_sign="numpy")(x))
    smooth = fastxai.gradcam(model, x, "layer3", eigen_smooth=True, svd_sign="numpy").maps
    default = fastxai.gradcam(model, x, "layer3", eigen_smooth=True).maps
    # the two signs give either the same map or another one, image by image; here some differ
    assert (smooth - default).abs().amax((1, 2)).max() > 0.1


def test_bad_svd_sign(tv_model, images):
    model = tv_model("resnet18")
    with pytest.raises(ValueError, match=r"svd_sign must be one of \['largest_positive', 'num"):
        compat.EigenCAM(model, [model.layer3], svd_sign="lapack")
    with pytest.raises(ValueError, match="svd_sign must be one of"):
        fastxai.eigencam(model, images(1, 32), "layer3", svd_sign="pgc")


def test_warning_names_the_option_and_the_option_silences_it(tv_model, images, monkeypatch):
    monkeypatch.setattr(fastxai._checks, "_WARNED_ONCE", set())
    model = tv_model("resnet18")
    x = images(1, 32)
    with pytest.warns(UserWarning, match="svd_sign='numpy'"):
        compat.EigenCAM(model, [model.layer3])(x)
    monkeypatch.setattr(fastxai._checks, "_WARNED_ONCE", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.EigenCAM(model, [model.layer3], svd_sign="numpy")(x)
        compat.GradCAM(model, [model.layer3], svd_sign="numpy")(x, eigen_smooth=True)
