"""RefineCAM and SESS against pytorch-grad-cam 1.5.7.

As in tests/test_compat_api.py, maps are compared with pytorch-grad-cam run in float64 (its
exact result), within 1e-5 plus pytorch-grad-cam's own float32 error against that result; each
comparison also checks that the reference maps vary.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch

from fastxai import compat

pgc = pytest.importorskip("pytorch_grad_cam", reason="pip install grad-cam==1.5.7 (test extra)")

TOLERANCE = 1e-5


def quiet(function):
    """pytorch-grad-cam prints from some destructors; keep the test output clean."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function()


def assert_matches_reference(got, expected, truth, what):
    assert got.dtype == np.float32 and got.shape == expected.shape == truth.shape, what
    tolerance = TOLERANCE + np.abs(expected - truth).max(axis=(1, 2))
    error = np.abs(got - truth).max(axis=(1, 2))
    assert (error <= tolerance).all(), f"{what}: {error} > {tolerance}"
    assert (truth.max(axis=(1, 2)) - truth.min(axis=(1, 2)) > 0.5).all(), what


def compare(tv_model, cls_name, model_name, layer_names, size, **options):
    """fastxai's ``cls_name`` against pytorch-grad-cam's in float32 and float64."""
    model = tv_model(model_name)
    model64 = copy.deepcopy(model).double()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    fastxai_options = {
        k: getattr(compat, v) if k == "base_method" else v for k, v in options.items()
    }
    pgc_options = {k: getattr(pgc, v) if k == "base_method" else v for k, v in options.items()}
    layers = [model.get_submodule(name) for name in layer_names]
    layers64 = [model64.get_submodule(name) for name in layer_names]
    got = getattr(compat, cls_name)(model, layers, **fastxai_options)(x)
    expected = quiet(lambda: getattr(pgc, cls_name)(model, layers, **pgc_options)(x))
    truth = quiet(lambda: getattr(pgc, cls_name)(model64, layers64, **pgc_options)(x.double()))
    assert_matches_reference(got, expected, truth, f"{cls_name} {model_name} {options}")


@pytest.mark.parametrize(
    ("model_name", "layers", "options"),
    [
        ("resnet18", ["layer2", "layer3", "layer4"], {}),
        ("resnet18", ["layer3", "layer4"], {"base_method": "FEM", "k": 1}),
        ("efficientnet_b0", ["features.5", "features.6"], {}),
        ("efficientnet_b0", ["features.6", "features.7"], {"base_method": "LayerCAM"}),
    ],
)
def test_refinecam_matches_pytorch_grad_cam(tv_model, model_name, layers, options):
    compare(tv_model, "RefineCAM", model_name, layers, (64, 64), **options)


def test_refinecam_eigen_smooth_is_the_product_of_eigen_smoothed_maps(tv_model):
    """pytorch-grad-cam's RefineCAM hands ``eigen_smooth`` to its CAMs as ``aug_smooth``; the
    defining property is the product of each layer's eigen-smoothed map (pytorch-grad-cam's)."""
    model = tv_model("resnet18")
    model64 = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    names = ["layer3", "layer4"]
    got = compat.RefineCAM(
        model,
        [model.get_submodule(n) for n in names],
        base_method=compat.GradCAM,
        svd_sign="numpy",
    )(x, None, True)

    def product(net, images):
        maps = [
            quiet(
                lambda n=n: pgc.GradCAM(net, [net.get_submodule(n)])(
                    images, None, eigen_smooth=True
                )
            )
            for n in names
        ]
        return np.float32([m / (m.max() + 1e-7) for m in np.prod(maps, axis=0)])

    expected, truth = product(model, x), product(model64, x.double())
    assert_matches_reference(got, expected, truth, "RefineCAM eigen_smooth")


SESS_CASES = [
    ("resnet18", "layer3", (64, 64), {"num_scales": 2}),
    ("resnet18", "layer3", (48, 64), {"num_scales": 2, "pool": "max", "smooth": False}),
    (
        "resnet18",
        "layer3",
        (64, 64),
        {
            "scales": [64, 96],
            "step_size": 24,
            "pre_filter_ratio": 0.5,
            "theta": 0.2,
            "use_softmax_scores": False,
            "batch_size": 3,
        },
    ),
    ("efficientnet_b0", "features.5", (56, 64), {"num_scales": 2, "window_size": 48}),
]


@pytest.mark.parametrize(("model_name", "layer", "size", "options"), SESS_CASES)
def test_sess_matches_pytorch_grad_cam(tv_model, model_name, layer, size, options):
    compare(tv_model, "SESS", model_name, [layer], size, **options)


def test_sess_with_targets_and_eigen_smooth(tv_model):
    targets = [compat_target(3), compat_target(7)]
    model = tv_model("resnet18")
    model64 = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    got = compat.SESS(model, [model.layer3], num_scales=2, svd_sign="numpy")(x, targets, True)
    pgc_targets = [pgc.utils.model_targets.ClassifierOutputTarget(c) for c in (3, 7)]
    expected = quiet(lambda: pgc.SESS(model, [model.layer3], num_scales=2)(x, pgc_targets, True))
    truth = quiet(
        lambda: pgc.SESS(model64, [model64.layer3], num_scales=2)(x.double(), pgc_targets, True)
    )
    assert_matches_reference(got, expected, truth, "SESS targets + eigen_smooth")


def compat_target(category):
    from fastxai.compat.utils.model_targets import ClassifierOutputTarget

    return ClassifierOutputTarget(category)


def test_model_modes_are_kept(tv_model):
    model = copy.deepcopy(tv_model("resnet18"))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    in_eval = [
        compat.SESS(model, [model.layer3], num_scales=2)(x),
        compat.RefineCAM(model, [model.layer3, model.layer4])(x),
    ]
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    in_train = [
        compat.SESS(model, [model.layer3], num_scales=2)(x),
        compat.RefineCAM(model, [model.layer3, model.layer4])(x),
    ]
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    for a, b in zip(in_eval, in_train, strict=True):
        assert np.array_equal(a, b) and a.std() > 0.1


def test_bad_input(tv_model):
    model = tv_model("resnet18")
    layers = [model.layer4]
    with pytest.raises(ValueError, match="pool must be 'mean' or 'max', got 'avg'"):
        compat.SESS(model, layers, pool="avg")
    with pytest.raises(ValueError, match=r"pre_filter_ratio must be in \[0, 1\), got 1.0"):
        compat.SESS(model, layers, pre_filter_ratio=1.0)
    with pytest.raises(ValueError, match="num_scales must be at least 1, got 0"):
        compat.SESS(model, layers, num_scales=0)
    with pytest.raises(ValueError, match="window_size must be a positive int or None, got 0"):
        compat.SESS(model, layers, window_size=0)
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"targets: expected one per image \(2\), got 1"):
        compat.SESS(model, layers)(x, [compat_target(0)])
    with pytest.raises(ValueError, match="scales: each must be at least the window size 32"):
        compat.SESS(model, layers, scales=[16])(x)
    with pytest.raises(ValueError, match="target_layers must be a non-empty list of modules"):
        compat.RefineCAM(model, [])
