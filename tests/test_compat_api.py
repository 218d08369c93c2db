"""fastxai.compat's further classes and BaseCAM's constructor and hooks against pytorch-grad-cam.

Maps are compared with pytorch-grad-cam 1.5.7 run in float64 (its exact result), within 1e-5
plus pytorch-grad-cam's own float32 error against that float64 result, so the tolerance comes
from the reference (a float32 map in [0, 1] after two min-max normalisations carries errors of a
few 1e-7 where nothing cancels; KPCA-CAM's float32 kernel PCA in scikit-learn is off by up to
5e-2 on efficientnet_b0, which the second term absorbs). Each comparison also checks that the
reference maps vary, so that an implementation returning constant maps would fail it.
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
from pytorch_grad_cam.base_cam import BaseCAM as ReferenceBaseCAM  # noqa: E402

TOLERANCE = 1e-5  # max |fastxai - pytorch-grad-cam| on maps in [0, 1], beyond its float32 error

# resnet18 is piecewise linear after every layer (Shapley-CAM's Hessian term is 0 there);
# efficientnet_b0's SiLU and sigmoid gates make the term matter.
LAYERS = [
    ("resnet18", "layer3"),
    ("resnet18", "layer4.1.conv2"),
    ("efficientnet_b0", "features.5"),
    ("efficientnet_b0", "features.6"),
]
DETERMINISTIC = ["GradCAMElementWise", "KPCA_CAM", "ShapleyCAM", "FinerCAM", "SegEigenCAM"]


def quiet(function, *args, **kwargs):
    """pytorch-grad-cam prints from some destructors; keep the test output clean."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function(*args, **kwargs)


def run_pgc(cls_name, model, layers, x, targets=None, **call):
    return quiet(lambda: getattr(pgc, cls_name)(model, layers)(x, targets, **call))


def assert_matches_reference(got, expected, truth, what):
    """``got`` within 1e-5 + the reference's own float32 error of the float64 ``truth``."""
    assert got.dtype == np.float32 and got.shape == expected.shape == truth.shape, what
    tolerance = TOLERANCE + np.abs(expected - truth).max(axis=(1, 2))
    error = np.abs(got - truth).max(axis=(1, 2))
    assert (error <= tolerance).all(), f"{what}: {error} > {tolerance}"
    # not vacuous: the reference maps are far from constant, so zero maps would fail
    assert (truth.max(axis=(1, 2)) - truth.min(axis=(1, 2)) > 0.5).all(), what


@pytest.mark.parametrize(("model_name", "layer_name"), LAYERS)
def test_deterministic_classes_match_pytorch_grad_cam(tv_model, images, model_name, layer_name):
    model = tv_model(model_name)
    x = images(2, 64)
    layer = model.get_submodule(layer_name)
    model64 = copy.deepcopy(model).double()
    layer64 = model64.get_submodule(layer_name)
    # fastxai first: pytorch-grad-cam's hooks stay on the model until its objects are collected
    got = {name: getattr(compat, name)(model, [layer])(x) for name in DETERMINISTIC}
    for name in DETERMINISTIC:
        expected = run_pgc(name, model, [layer], x)
        truth = run_pgc(name, model64, [layer64], x.double())
        assert_matches_reference(got[name], expected, truth, f"{name} at {model_name}.{layer_name}")


def test_shapley_term_is_exercised(tv_model, images):
    """Shapley-CAM differs from Grad-CAM on efficientnet_b0, so its parity checks the Hessian
    term, and equals it on resnet18 (piecewise linear after the layer: the term is 0)."""
    x = images(2, 64)
    model = tv_model("efficientnet_b0")
    shapley = fastxai.shapleycam(model, x, "features.6").maps
    assert (shapley - fastxai.gradcam(model, x, "features.6").maps).abs().max() > 0.05
    resnet = tv_model("resnet18")
    shapley = fastxai.shapleycam(resnet, x, "layer3").maps
    assert torch.allclose(shapley, fastxai.gradcam(resnet, x, "layer3").maps, atol=1e-6)


@pytest.mark.parametrize(("model_name", "layer_name"), LAYERS)
def test_eigen_grad_cam_matches_up_to_sign(tv_model, images, model_name, layer_name):
    """The SVD sign is arbitrary: each map equals pytorch-grad-cam's for one of the two signs."""
    model = tv_model(model_name)
    x = images(2, 64)
    model64 = copy.deepcopy(model).double()
    got = compat.EigenGradCAM(model, [model.get_submodule(layer_name)])(x)
    raw = fastxai.eigengradcam(model, x, layer_name).raw
    flipped = fastxai.ops.scale_maps(-raw, (64, 64)).numpy()
    truth = run_pgc("EigenGradCAM", model64, [model64.get_submodule(layer_name)], x.double())
    for n in range(2):
        error = min(np.abs(got[n] - truth[n]).max(), np.abs(flipped[n] - truth[n]).max())
        assert error <= TOLERANCE, f"{model_name}.{layer_name} image {n}: {error:.2e}"
        assert truth[n].max() - truth[n].min() > 0.5


def test_multi_layer_and_eigen_smooth_match(tv_model, images):
    model = tv_model("resnet18")
    x = images(2, 64)
    layers = [model.layer2, model.layer4]
    for name in ("GradCAMElementWise", "KPCA_CAM", "ShapleyCAM"):
        expected = run_pgc(name, model, layers, x)
        got = getattr(compat, name)(model, layers)(x)
        assert np.abs(got - expected).max() <= TOLERANCE, name
        assert expected.std() > 0.1
    # eigen_smooth: the SVD sign is arbitrary in pytorch-grad-cam, so each map equals one of the
    # two maps fastxai could give
    model64 = copy.deepcopy(model).double()
    truth = run_pgc("GradCAMElementWise", model64, [model64.layer3], x.double(), eigen_smooth=True)
    got = compat.GradCAMElementWise(model, [model.layer3])(x, eigen_smooth=True)
    raw = fastxai.gradcamelementwise(model, x, "layer3", eigen_smooth=True).raw
    flipped = fastxai.ops.scale_maps(-raw, (64, 64)).numpy()
    for n in range(2):
        error = min(np.abs(got[n] - truth[n]).max(), np.abs(flipped[n] - truth[n]).max())
        assert error <= TOLERANCE, f"image {n}: {error:.2e}"
        assert truth[n].max() - truth[n].min() > 0.5


@pytest.mark.parametrize(
    ("model_name", "layer_name", "k"),
    [("resnet18", "layer3", 0), ("resnet18", "layer3", 1.5), ("efficientnet_b0", "features.5", 2)],
)
def test_fem_matches(tv_model, images, model_name, layer_name, k):
    """FEM and its ``k`` (standard deviations above the channel mean; with 2 x 2 maps no value
    can exceed 2, so FEM needs a layer with more positions), and the functional method."""
    model = tv_model(model_name)
    x = images(2, 64)
    layer = model.get_submodule(layer_name)
    model64 = copy.deepcopy(model).double()
    layer64 = model64.get_submodule(layer_name)
    got = compat.FEM(model, [layer], k=k)(x)
    expected = quiet(lambda: pgc.FEM(model, [layer], k=k)(x, None))
    truth = quiet(lambda: pgc.FEM(model64, [layer64], k=k)(x.double(), None))
    assert_matches_reference(got, expected, truth, f"{model_name}.{layer_name} k={k}")
    other = compat.FEM(model, [layer], k=1 if k == 2 else 2)(x)
    assert np.abs(got - other).max() > 0.05  # k matters
    assert np.array_equal(got, fastxai.fem(model, x, layer_name, k=k).maps.numpy())
    # eigen_smooth changes nothing, as in pytorch-grad-cam
    assert np.array_equal(got, compat.FEM(model, [layer], k=k)(x, eigen_smooth=True))


def test_seg_eigen_cam_of_a_segmentation_model(tv_model, images):
    """Seg-Eigen-CAM's use: a segmentation model's (N, K, H, W) scores, read by
    SemanticSegmentationTarget, through the functional method and the class."""
    from torchvision.models.segmentation import fcn_resnet50

    torch.manual_seed(0)
    model = fcn_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=False)
    model = model.eval()

    class Out(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)["out"]

    wrapped = Out(model)
    x = images(1, 64)
    mask = (wrapped(x)[0].argmax(0) == 1).float().numpy()
    targets = [pgc.utils.model_targets.SemanticSegmentationTarget(1, mask)]
    layer = model.backbone.layer3
    expected = quiet(lambda: pgc.SegEigenCAM(wrapped, [layer])(x, targets))
    got = compat.SegEigenCAM(wrapped, [layer])(x, targets)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert expected.max() - expected.min() > 0.5
    functional = fastxai.segeigencam(wrapped, x, "net.backbone.layer3", targets).maps.numpy()
    assert np.array_equal(got, functional)


@pytest.mark.parametrize("kernel", ["rbf", "poly", "linear", "cosine"])
def test_kpca_kernels_match(tv_model, images, kernel):
    model = tv_model("resnet18")
    x = images(2, 64)
    model64 = copy.deepcopy(model).double()
    got = compat.KPCA_CAM(model, [model.layer3], kernel=kernel, gamma=0.01)(x)
    reference = pgc.KPCA_CAM
    expected = quiet(lambda: reference(model, [model.layer3], kernel=kernel, gamma=0.01)(x, None))
    truth = quiet(
        lambda: reference(model64, [model64.layer3], kernel=kernel, gamma=0.01)(x.double(), None)
    )
    assert_matches_reference(got, expected, truth, kernel)
    with pytest.raises(ValueError, match="kernel must be one of"):
        compat.KPCA_CAM(model, [model.layer3], kernel="chi2")(x)


@pytest.mark.parametrize(
    "options", [{}, {"alpha": 0.5, "comparison_categories": [2, 5]}, {"target_idx": 7}]
)
def test_finer_cam_options_match(tv_model, images, options):
    model = tv_model("resnet18")
    x = images(3, 64)
    layer = model.layer3
    expected = quiet(lambda: pgc.FinerCAM(model, [layer])(x, **options))
    got = compat.FinerCAM(model, [layer])(x, **options)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert (expected.max(axis=(1, 2)) - expected.min(axis=(1, 2)) > 0.5).all()
    # the options are not ignored: they change the maps
    baseline = compat.FinerCAM(model, [layer])(x, **({} if options else {"alpha": 0.0}))
    assert np.abs(baseline - got).max() > 1e-2


def test_finer_cam_with_another_base_method(tv_model, images):
    model = tv_model("resnet18")
    x = images(2, 64)
    expected = quiet(lambda: pgc.FinerCAM(model, [model.layer3], base_method=pgc.LayerCAM)(x))
    got = compat.FinerCAM(model, [model.layer3], base_method=compat.LayerCAM)(x)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert expected.std() > 0.1


@pytest.mark.parametrize(
    ("model_name", "layers"),
    [("resnet18", ["layer3"]), ("efficientnet_b0", ["features.5", "features.6"])],
)
def test_random_cam_draws_as_pytorch_grad_cam(tv_model, images, model_name, layers):
    """Both draw the weights from NumPy's global generator in the same order, so one seed gives
    the same maps; another seed gives other maps (the comparison sees the weights)."""
    model = tv_model(model_name)
    x = images(2, 64)
    modules = [model.get_submodule(name) for name in layers]
    np.random.seed(11)
    expected = run_pgc("RandomCAM", model, modules, x)
    np.random.seed(11)
    got = compat.RandomCAM(model, modules)(x)
    assert np.abs(got - expected).max() <= TOLERANCE
    np.random.seed(12)
    other = compat.RandomCAM(model, modules)(x)
    assert np.abs(other - expected).max() > 0.1


def test_native_random_cam_weights_and_map(tv_model, images):
    model = tv_model("resnet18")
    x = images(2, 64)
    explanation = fastxai.randomcam(model, x, "layer3", generator=torch.Generator().manual_seed(3))
    weights = explanation.extras["weights"]
    assert weights.shape == (2, 256)
    draw = torch.rand(2, 256, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(weights, (2 * draw - 1).float())
    # uniform on [-1, 1]: mean 0 and standard deviation 1/sqrt(3), here over 512 draws
    assert weights.abs().max() <= 1 and abs(weights.mean()) < 0.1
    assert abs(weights.std() - 3**-0.5) < 0.05
    kept = {}
    handle = model.layer3.register_forward_hook(lambda m, i, o: kept.update(a=o.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    expected = (weights[:, :, None, None] * kept["a"]).sum(1)
    assert torch.allclose(explanation.raw, expected, atol=1e-5)
    again = fastxai.randomcam(model, x, "layer3", generator=torch.Generator().manual_seed(4))
    assert (again.maps - explanation.maps).abs().max() > 0.1


class _AbsGradientWeights:
    """A user's weighting rule, written once for both libraries' BaseCAM."""

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        assert isinstance(activations, np.ndarray) and isinstance(grads, np.ndarray)
        assert len(targets) == input_tensor.shape[0]
        return np.abs(grads).mean(axis=(2, 3)) * (1 + np.arange(grads.shape[1]) % 3)


class _ActivationOnlyImage:
    """A user's raw map from activations alone (``uses_gradients=False`` gives no gradient)."""

    def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth):
        assert grads is None
        return (activations**2).sum(axis=1) - activations.mean(axis=1)


@pytest.mark.parametrize(
    ("mixin", "base", "options"),
    [
        (_AbsGradientWeights, "BaseCAM", {}),
        (_AbsGradientWeights, "GradCAM", {}),
        (_ActivationOnlyImage, "BaseCAM", {"uses_gradients": False}),
    ],
)
def test_subclass_hooks_give_the_subclass_maps(tv_model, images, mixin, base, options):
    model = tv_model("resnet18")
    x = images(2, 64)
    reference_base = ReferenceBaseCAM if base == "BaseCAM" else pgc.GradCAM
    reference = type("Reference", (mixin, reference_base), {})
    mine = type("Mine", (mixin, getattr(compat, base)), {})
    layers = [model.layer2, model.layer3]
    kwargs = options if base == "BaseCAM" else {}
    expected = quiet(lambda: reference(model, layers, **kwargs)(x, None))
    got = mine(model, layers, **kwargs)(x)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert expected.std() > 0.1
    # the hook is what made the maps: Grad-CAM's own maps are far from them
    assert np.abs(got - compat.GradCAM(model, layers)(x)).max() > 0.1


def test_subclass_hook_sees_tensors_without_detach(tv_model, images):
    seen = []

    class Mine(compat.BaseCAM):
        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
            seen.append((type(activations), type(grads), target_layer))
            return grads.mean((2, 3))

    model = tv_model("resnet18")
    x = images(2, 64)
    got = Mine(model, [model.layer3], detach=False)(x)
    assert seen == [(torch.Tensor, torch.Tensor, model.layer3)]
    assert np.array_equal(got, compat.GradCAM(model, [model.layer3])(x))
    with pytest.raises(NotImplementedError, match="get_cam_weights"):
        compat.BaseCAM(model, [model.layer3])(x)


@pytest.mark.parametrize(
    "name",
    [
        "GradCAM",
        "EigenCAM",
        "EigenGradCAM",
        "GradCAMElementWise",
        "KPCA_CAM",
        "RandomCAM",
        "ShapleyCAM",
        "ScoreCAM",
        "AblationCAM",
        "FEM",
        "SegEigenCAM",
    ],
)
def test_constructor_attributes_match(tv_model, name):
    model = tv_model("resnet18")
    reference = quiet(lambda: getattr(pgc, name)(model, [model.layer4]))
    mine = getattr(compat, name)(model, [model.layer4])
    for attribute in ("uses_gradients", "compute_input_gradient", "detach", "device"):
        assert getattr(mine, attribute) == getattr(reference, attribute), (name, attribute)
    quiet(reference.activations_and_grads.release)


def test_tta_transforms_match(tv_model, images):
    tta = pytest.importorskip("ttach")
    model = tv_model("resnet18")
    x = images(2, 64)
    transforms = tta.Compose([tta.VerticalFlip(), tta.Multiply(factors=[0.8, 1.2])])
    # pytorch-grad-cam's GradCAM takes no tta_transforms; its BaseCAM does
    reference = pgc.GradCAM.__new__(pgc.GradCAM)
    quiet(ReferenceBaseCAM.__init__, reference, model, [model.layer3], tta_transforms=transforms)
    expected = quiet(reference, x, None, aug_smooth=True)
    maps = compat.GradCAM(model, [model.layer3], tta_transforms=transforms)(x, aug_smooth=True)
    assert np.abs(maps - expected).max() <= TOLERANCE
    # the transforms were used: the default augmentation gives other maps
    assert np.abs(maps - compat.GradCAM(model, [model.layer3])(x, aug_smooth=True)).max() > 1e-2


@pytest.mark.parametrize("model_name", ["vgg11_bn", "resnet18"])
def test_fullgrad_matches(tv_model, images, model_name):
    """Every Conv2d/BatchNorm2d bias term and the input term, against pytorch-grad-cam in
    float64 (its FullGrad keeps its hooks, so it runs on copies)."""
    model = tv_model(model_name)
    x = images(2, 64)
    got = compat.FullGrad(model, [])(x)
    smooth = compat.FullGrad(model, [])(x, eigen_smooth=True)
    expected = run_fullgrad(copy.deepcopy(model), x)
    truth = run_fullgrad(copy.deepcopy(model).double(), x.double())
    assert_matches_reference(got, expected, truth, model_name)
    # eigen_smooth: a projection, whose sign pytorch-grad-cam leaves arbitrary; the other sign's
    # map is 1 - map (min-max commutes with negation, and bilinear resizing with 1 - z)
    truth = run_fullgrad(copy.deepcopy(model).double(), x.double(), eigen_smooth=True)
    for n in range(2):
        error = min(np.abs(smooth[n] - truth[n]).max(), np.abs(1 - smooth[n] - truth[n]).max())
        assert error <= TOLERANCE, f"{model_name} eigen_smooth image {n}: {error:.2e}"
        assert truth[n].max() - truth[n].min() > 0.5


def run_fullgrad(model, x, **call):
    return quiet(lambda: pgc.FullGrad(model, [])(x, None, **call))


def test_fullgrad_uses_the_bias_terms(tv_model, images):
    """The maps are far from the input term alone, so the parity test sees the bias terms."""
    model = tv_model("vgg11_bn")
    x = images(2, 64)
    leaf = x.clone().requires_grad_(True)
    logits = model(leaf)
    (grad,) = torch.autograd.grad(logits.max(1).values.sum(), leaf)
    input_term = fastxai.ops.reference.minmax(
        fastxai.ops.reference.minmax((grad * x).abs()).sum(1)
    ).numpy()
    assert np.abs(compat.FullGrad(model, [])(x) - input_term).max() > 0.1


@pytest.mark.parametrize("target_category", [None, 7])
def test_guided_backprop_matches(tv_model, images, target_category):
    model = tv_model("resnet18")
    x = images(1, 64)
    before = [(m, m.training) for m in model.modules()]
    got = compat.GuidedBackpropReLUModel(model)(x, target_category)
    # pytorch-grad-cam swaps the model's ReLUs (and leaves non-in-place ones): run it on a copy
    expected = quiet(
        lambda: pgc.GuidedBackpropReLUModel(copy.deepcopy(model))(x.clone(), target_category)
    )
    assert got.shape == expected.shape == (64, 64, 3) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()
    # the guidance matters: the plain input gradient differs
    leaf = x.clone().requires_grad_(True)
    logits = model(leaf)
    category = int(logits[0].argmax()) if target_category is None else target_category
    (plain,) = torch.autograd.grad(logits[0, category], leaf)
    plain = plain[0].permute(1, 2, 0).numpy()
    assert np.abs(plain - expected).max() > 0.1 * np.abs(expected).max()
    assert all(isinstance(m, torch.nn.ReLU) for m in model.modules() if "ReLU" in type(m).__name__)
    assert not any(m._forward_hooks for m in model.modules())
    assert [(m, m.training) for m in model.modules()] == before


def test_guided_backprop_bad_input(tv_model, images):
    model = tv_model("resnet18")
    with pytest.raises(ValueError, match="target_category"):
        compat.GuidedBackpropReLUModel(model)(images(1, 32), 1000)
    with pytest.raises(ValueError, match="device"):
        compat.GuidedBackpropReLUModel(model, device="meta")
    assert not any(m._forward_hooks for m in model.modules())
