"""Every fastxai.compat class against pytorch-grad-cam 1.5.7 on classifiers, a ViT, a Swin, a
segmentation model and a detector, two layers each.

Each map is compared with pytorch-grad-cam run in float64 (its exact result, up to the float32
casts it makes itself) within 1e-5 plus twice pytorch-grad-cam's own float32 error against that
result, per image: the tolerance comes from the reference, never from fastxai's output. Twice:
the two libraries sum in different orders (and fastxai's order depends on the thread count), so
either one's float32 result may be the further from float64, by a factor below two here. Every
comparison also checks that it could fail: the zero map, the best constant map and the inverted
map ``1 - truth`` are each outside the tolerance (so no tolerance reaches half the map's range).

Where fastxai differs on purpose (``fastxai.compat``'s docstring), the reference is
pytorch-grad-cam with only that behaviour changed, each marked where it is built.

Models have random weights (no downloads) and are built once per module; pytorch-grad-cam runs on
deep copies (it sets hooks, swaps modules and writes ``.grad``), fastxai on the originals.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torchvision
from conftest import randomise_batchnorm
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from fastxai import compat
from fastxai.compat.utils import model_targets as fx_targets
from fastxai.compat.utils import reshape_transforms as fx_reshape

pgc = pytest.importorskip("pytorch_grad_cam", reason="pip install grad-cam==1.5.7 (test extra)")
timm = pytest.importorskip("timm", reason="pip install timm==1.0.31 (test extra)")
from pytorch_grad_cam import ablation_cam as pgc_ablation_cam  # noqa: E402
from pytorch_grad_cam import ablation_layer as pgc_ablation  # noqa: E402
from pytorch_grad_cam import base_cam as pgc_base_cam  # noqa: E402
from pytorch_grad_cam import eigen_cam as pgc_eigen_cam  # noqa: E402
from pytorch_grad_cam import eigen_grad_cam as pgc_eigen_grad_cam  # noqa: E402
from pytorch_grad_cam import fullgrad_cam as pgc_fullgrad  # noqa: E402
from pytorch_grad_cam.utils import model_targets as pgc_targets  # noqa: E402
from pytorch_grad_cam.utils import reshape_transforms as pgc_reshape  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection  # noqa: E402

pytestmark = [
    # fastxai's notes on its deliberate differences and on the torch.fx fallback
    pytest.mark.filterwarnings("ignore::UserWarning"),
    # pytorch-grad-cam's destructors detach views in place after their hooks were released
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

TOLERANCE = 1e-5  # max |fastxai - pytorch-grad-cam| on maps in [0, 1], beyond its float32 error


# --- models -----------------------------------------------------------------------------------


class SegmentationOutput(nn.Module):
    """torchvision's segmentation models return a dict; pytorch-grad-cam's tutorial wraps them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _eval(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        randomise_batchnorm(model, torch.Generator().manual_seed(1))
    return model.eval()


def build(arch: str) -> nn.Module:
    """Small configurations of each family, random weights (CI time: Score-CAM and Ablation-CAM
    run the network once per channel)."""
    torch.manual_seed(0)
    if arch == "mobilenet_v3_small":
        return _eval(torchvision.models.mobilenet_v3_small(weights=None, num_classes=10))
    if arch in ("test_resnet", "test_efficientnet"):  # timm's small test networks
        return _eval(timm.create_model(arch, pretrained=False, num_classes=10))
    if arch == "vit":
        # timm's small test ViT (6 blocks, width 64) on 32 x 32 images in 8 x 8 patches
        model = timm.create_model(
            "test_vit", pretrained=False, img_size=32, patch_size=8, num_classes=10
        ).eval()
        # attention written out: the fused CPU kernel has no second derivative, which
        # Shapley-CAM's Hessian term needs (pytorch-grad-cam's too)
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
        return model
    if arch == "swin":
        # swin_tiny_patch4_window7_224 narrowed: 2 x 2 patches and windows, stages of 16, 8, 4
        # and 2 tokens a side on 32 x 32 images
        return timm.create_model(
            "swin_tiny_patch4_window7_224",
            pretrained=False,
            img_size=32,
            patch_size=2,
            window_size=2,
            embed_dim=16,
            depths=(1, 1, 2, 1),
            num_heads=(1, 2, 2, 4),
            num_classes=10,
        ).eval()
    if arch == "deeplabv3":
        model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=4, aux_loss=False
        )
        return SegmentationOutput(_eval(model))
    if arch == "fasterrcnn":
        model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None,
            weights_backbone=None,
            num_classes=5,
            box_score_thresh=0.0,
            min_size=160,
            max_size=160,
            rpn_post_nms_top_n_test=20,
            box_detections_per_img=20,
        )
        # the box head narrowed from 1024 to 64 features (its 12544 x 1024 layer dominates)
        model.roi_heads.box_head = TwoMLPHead(256 * 7 * 7, 64)
        model.roi_heads.box_predictor = FastRCNNPredictor(64, 5)
        return _eval(model)
    raise KeyError(arch)


IMAGE_SIZE = {
    "test_resnet": 32,
    "mobilenet_v3_small": 32,
    "test_efficientnet": 32,
    "vit": 32,
    "swin": 32,
    "deeplabv3": 64,
    "fasterrcnn": 96,
}
CLASSIFIERS = ["test_resnet", "mobilenet_v3_small", "test_efficientnet", "vit", "swin"]


@dataclass
class Subject:
    """A model, its images and each library's targets for them (one per image)."""

    model: nn.Module
    x: torch.Tensor
    targets: dict  # {"fastxai": [...], "pgc": [...]}

    @functools.cached_property
    def reference_model(self) -> nn.Module:
        return copy.deepcopy(self.model)

    @functools.cached_property
    def truth_model(self) -> nn.Module:
        return copy.deepcopy(self.model).double()


def make_targets(arch: str, model: nn.Module, x: torch.Tensor) -> dict:
    with torch.no_grad():
        outputs = model(x)
    if arch == "deeplabv3":
        # each image's most frequent predicted class, over the pixels predicted as it
        labels = outputs.argmax(1)
        chosen = [int(torch.bincount(n.flatten()).argmax()) for n in labels]
        masks = [(n == c).float().numpy() for n, c in zip(labels, chosen, strict=True)]
        return {
            lib: [
                module.SemanticSegmentationTarget(c, m) for c, m in zip(chosen, masks, strict=True)
            ]
            for lib, module in (("fastxai", fx_targets), ("pgc", pgc_targets))
        }
    if arch == "fasterrcnn":
        boxes = []
        for out in outputs:
            keep = out["scores"].argsort(descending=True)[:3]
            boxes.append((out["labels"][keep], out["boxes"][keep]))
        return {
            "fastxai": [fx_targets.FasterRCNNBoxScoreTarget(*b) for b in boxes],
            "pgc": [
                pgc_targets.FasterRCNNBoxScoreTarget(labels.tolist(), box.numpy())
                for labels, box in boxes
            ],
        }
    # Each image's top-1 class: with random weights another class's map is often all zero.
    top1 = outputs.argmax(1).tolist()
    return {
        "fastxai": [fx_targets.ClassifierOutputTarget(c) for c in top1],
        "pgc": [pgc_targets.ClassifierOutputTarget(c) for c in top1],
    }


@pytest.fixture(scope="module")
def subject():
    """``subject(arch)``: built on first use, kept for the module."""
    cache = {}

    def get(arch: str) -> Subject:
        if arch not in cache:
            model = build(arch)
            size = IMAGE_SIZE[arch]
            g = torch.Generator().manual_seed(0)
            if arch == "fasterrcnn":
                x = torch.rand(2, 3, size, size, generator=g)
            else:
                x = torch.randn(2, 3, size, size, generator=g)
            cache[arch] = Subject(model, x, make_targets(arch, model, x))
        return cache[arch]

    return get


# --- cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    arch: str
    layer: str
    grid: tuple[int, int] | None = None  # token grid (ViT / Swin)
    nonnegative: bool = True  # the layer ends in a ReLU (Ablation-CAM: see AblationLayer below)

    @property
    def id(self) -> str:
        return f"{self.arch}:{self.layer}"

    def reshape(self, lib: str):
        module = fx_reshape if lib == "fastxai" else pgc_reshape
        if self.arch == "vit":
            return functools.partial(module.vit_reshape_transform, height=4, width=4)
        if self.arch == "swin":
            h, w = self.grid
            return functools.partial(module.swinT_reshape_transform, height=h, width=w)
        if self.arch == "fasterrcnn" and self.layer == "backbone":
            return module.fasterrcnn_reshape_transform
        return None

    @property
    def tokens(self) -> bool:
        return self.arch in ("vit", "swin")

    @property
    def float64_truth(self) -> bool:
        """A detector run in float64 keeps other proposals (top-n, NMS and score thresholds on
        other roundings), so it explains other boxes: there the float64 truth is
        pytorch-grad-cam's formulas in float64 on what its float32 run captured (else its
        float32 maps within 1e-5)."""
        return self.arch != "fasterrcnn"

    @property
    def pyramid(self) -> bool:
        return self.arch == "fasterrcnn" and self.layer == "backbone"


# Layers whose output nothing modifies in place afterwards (fastxai captures the output the layer
# returned; pytorch-grad-cam keeps an alias that a later in-place ReLU would overwrite), with few
# channels (Score-CAM and Ablation-CAM run the network once per channel), where the random
# networks' reference maps are not all zero (see DEGENERATE).
CASES = [
    Case("test_resnet", "layer1"),
    Case("test_resnet", "layer2"),
    Case("mobilenet_v3_small", "features.0", nonnegative=False),
    Case("mobilenet_v3_small", "features.1", nonnegative=False),
    Case("test_efficientnet", "blocks.0", nonnegative=False),
    Case("test_efficientnet", "blocks.1.0.conv_pwl", nonnegative=False),
    # pytorch-grad-cam's ViT and Swin tutorials: a block's LayerNorm, tokens laid on the grid.
    # torch.fx cannot trace timm's ViT, and after these Swin and deeplabv3 layers the network
    # reads ints or the input's size computed before them: Ablation-CAM (and Shapley-CAM on the
    # ViT) re-run the whole model with the layer's output replaced there.
    Case("vit", "blocks.5.norm1", grid=(4, 4), nonnegative=False),
    Case("vit", "blocks.2.norm1", grid=(4, 4), nonnegative=False),
    Case("swin", "layers.2.blocks.1.norm2", grid=(4, 4), nonnegative=False),
    Case("swin", "layers.1.blocks.0.norm2", grid=(8, 8), nonnegative=False),
    # the segmentation tutorial's target, on the head's class scores and in the backbone
    Case("deeplabv3", "model.classifier.4", nonnegative=False),
    Case("deeplabv3", "model.backbone.1", nonnegative=False),
    # the detection tutorial's feature pyramid, and the backbone's last tensor layer
    Case("fasterrcnn", "backbone", nonnegative=False),
    Case("fasterrcnn", "backbone.body.12", nonnegative=False),
]

# Classes whose pytorch-grad-cam maps differ only in get_cam_weights / get_cam_image on the
# activations and gradients that its BaseCAM.forward captured: one captured pass feeds them all.
ONE_PASS = [
    "GradCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "LayerCAM",
    "HiResCAM",
    "GradCAMElementWise",
    "EigenGradCAM",
    "RandomCAM",
    "SubclassCAM",
    "FEM",
    "SegEigenCAM",
]
# Detector outputs are per-image dicts: no logits for Finer-CAM's default targets; Score-CAM and
# Ablation-CAM would re-run the whole detector once per channel (Ablation-CAM's pyramid recipe has
# its own test, test_compat_detection_ablation.py); Shapley-CAM's Hessian term meets MobileNetV3's
# hardsigmoid, which has no second derivative in torch (both libraries raise).
EVERYWHERE = [*ONE_PASS, "EigenCAM", "KPCA_CAM"]
NOT_DETECTION = ["ShapleyCAM", "ScoreCAM", "AblationCAM"]
# Shapley-CAM's Hessian term differentiates the network after the layer twice: MobileNetV3's
# hardsigmoid has no second derivative in torch, and after deeplabv3's last convolution the
# network is linear, so pytorch-grad-cam itself raises there (no reference).
NO_REFERENCE = {
    ("ShapleyCAM", "mobilenet_v3_small"),
    ("ShapleyCAM", "deeplabv3"),
}
# (class, case id): the reference map of at least one image is constant (the ReLU of a raw map
# that is negative everywhere, with these random weights), so the comparison has no power there;
# test_degenerate_cases_agree checks fastxai's maps are constant for those images too.
DEGENERATE = {
    ("GradCAMPlusPlus", "mobilenet_v3_small:features.0"),
    ("GradCAMPlusPlus", "mobilenet_v3_small:features.1"),
    ("RandomCAM", "fasterrcnn:backbone.body.12"),
}
# (class, case id): pytorch-grad-cam's float32 maps are as far from its float64 result as the
# maps' range (the float64 map of one image is all zero, or every weight (y - y_k) / y is below
# float32's resolution, so float32 rounding makes a full map of noise): no comparison can tell
# right from wrong there.
ILL_CONDITIONED = {
    ("AblationCAM", "mobilenet_v3_small:features.0"),
    ("AblationCAM", "mobilenet_v3_small:features.1"),
    ("AblationCAM", "deeplabv3:model.backbone.1"),
}


def classes_for(case: Case) -> list[str]:
    names = list(EVERYWHERE)
    if case.arch != "fasterrcnn":
        names += NOT_DETECTION
    if case.arch in CLASSIFIERS:
        names.append("FinerCAM")
    return [
        name
        for name in names
        if (name, case.arch) not in NO_REFERENCE
        and (name, case.id) not in DEGENERATE | ILL_CONDITIONED
    ]


MATRIX = [
    pytest.param(name, case, id=f"{name}-{case.id}") for case in CASES for name in classes_for(case)
]


# --- references -------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet():
    """pytorch-grad-cam prints progress bars and messages."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def sign_fixed_projection(activation_batch: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's projection with the SVD sign fixed as fastxai fixes it (largest-magnitude
    value positive): the sign is arbitrary, a deliberate difference."""
    projections = get_2d_projection(activation_batch)
    for projection in projections:
        if projection.flat[np.abs(projection).argmax()] < 0:
            projection *= -1
    return projections


@pytest.fixture(scope="module", autouse=True)
def sign_fixed_reference():
    with pytest.MonkeyPatch.context() as patch:
        for module in (pgc_base_cam, pgc_eigen_cam, pgc_eigen_grad_cam, pgc_fullgrad):
            patch.setattr(module, "get_2d_projection", sign_fixed_projection)
        yield


class PyramidCapture:
    """pytorch-grad-cam's activation and gradient capture for a layer returning a dict of feature
    maps, where its own registers gradient hooks on tensor outputs only (its gradient methods
    fail on a detector's backbone): a tensor hook records each level's gradient (levels no score
    reaches get 0) and the reshape transform is applied to the dicts of activations and of
    gradients, as pytorch-grad-cam applies it to a tensor and its gradient."""

    def __init__(self, model: nn.Module, layer: nn.Module, reshape_transform) -> None:
        self.model = model
        self.reshape_transform = reshape_transform
        self.handle = layer.register_forward_hook(self.keep)
        self.activations: list = []
        self.levels: dict = {}
        self.level_grads: dict = {}

    def keep(self, module, inputs, output) -> None:
        self.levels, self.level_grads = dict(output), {}
        self.activations = [self.reshape_transform(output).detach()]
        for name, value in output.items():
            value.register_hook(functools.partial(self.level_grads.__setitem__, name))

    @property
    def gradients(self) -> list:
        grads = {k: self.level_grads.get(k, torch.zeros_like(v)) for k, v in self.levels.items()}
        return [self.reshape_transform(grads).detach()]

    def __call__(self, x):
        return self.model(x)

    def release(self) -> None:
        self.handle.remove()


@dataclass
class CapturedPass:
    """What one pytorch-grad-cam forward captured, handed to another class's formulas."""

    activations: list
    gradients: list

    def release(self) -> None:
        pass


class ZeroAblationLayer(pgc_ablation.AblationLayer):
    """pytorch-grad-cam's ablation with the ablated channel set to 0 (the paper's and fastxai's;
    pytorch-grad-cam uses min - 1e7 where the layer output has no zero minimum)."""

    def __call__(self, x):
        output = self.activations
        for i in range(output.size(0)):
            output[i, self.indices[i], :] = 0
        return output


class ZeroAblationLayerVit(pgc_ablation.AblationLayerVit):
    """The same for token outputs (channels last)."""

    def __call__(self, x):
        output = self.activations.transpose(1, -1)
        for i in range(output.size(0)):
            output[i, self.indices[i], :] = 0
        return output.transpose(-1, 1)


class ReshapedShapleyCAM(pgc.ShapleyCAM):
    """pytorch-grad-cam's Shapley-CAM with its weights applied to the reshaped activations (it
    applies them to the untransformed ones, which fails for token outputs; fastxai reshapes
    both, a deliberate difference)."""

    def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth):
        weights = self.get_cam_weights(input_tensor, target_layer, targets, activations, grads)
        maps = self.activations_and_grads.reshape_transform(activations).detach().cpu().numpy()
        return (weights[:, :, None, None] * maps).sum(axis=1)


class _SignedGradientWeights:
    """A user's weighting rule through BaseCAM's hook, written once for both libraries."""

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        grads = np.asarray(grads)
        return np.abs(grads).mean(axis=(2, 3)) - 0.5 * np.abs(grads.mean(axis=(2, 3)))


class ReferenceSubclassCAM(_SignedGradientWeights, pgc_base_cam.BaseCAM):
    pass


class SubclassCAM(_SignedGradientWeights, compat.BaseCAM):
    pass


class Float64KPCA(pgc.KPCA_CAM):
    """pytorch-grad-cam's KPCA-CAM on the float32 activations cast to float64."""

    def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth):
        activations = np.asarray(activations, dtype=np.float64)
        return super().get_cam_image(
            input_tensor, target_layer, targets, activations, grads, eigen_smooth
        )


class _NumPyInFloat64:
    """NumPy with ``float32`` meaning ``float64``, for pytorch-grad-cam's Ablation-CAM module."""

    def __getattr__(self, name: str):
        return np.float64 if name == "float32" else getattr(np, name)


def reference_class(name: str, case: Case):
    if name == "Float64KPCA":
        return Float64KPCA
    if name == "SubclassCAM":
        return ReferenceSubclassCAM
    if name == "ShapleyCAM" and case.tokens:
        return ReshapedShapleyCAM
    return getattr(pgc, name)


def reference_options(name: str, case: Case) -> dict:
    if name != "AblationCAM":
        return {"batch_size": 64} if name == "ScoreCAM" else {}
    if case.tokens:
        layer = pgc_ablation.AblationLayerVit() if case.nonnegative else ZeroAblationLayerVit()
    else:
        layer = pgc_ablation.AblationLayer() if case.nonnegative else ZeroAblationLayer()
    return {"ablation_layer": layer, "batch_size": 64}


def run_reference(name: str, case: Case, model: nn.Module, x: torch.Tensor, targets) -> np.ndarray:
    """One class, end to end, as a user of pytorch-grad-cam runs it."""
    layer = model.get_submodule(case.layer)
    options = reference_options(name, case)
    batch_size = options.pop("batch_size", None)
    with quiet():
        cam = reference_class(name, case)(model, [layer], case.reshape("pgc"), **options)
        if name == "ScoreCAM":
            cam.batch_size = batch_size  # its masked copies per forward (16 by default)
        elif batch_size is not None:
            cam.batch_size = batch_size
        inner = cam.base_cam if name == "FinerCAM" else cam
        try:
            if name == "FinerCAM":
                return cam(x)  # its default targets: each image's top class against the nearest
            return cam(x, targets)
        finally:
            release(inner.activations_and_grads)


def release(capture) -> None:
    """Remove pytorch-grad-cam's hooks; its own release detaches the kept tensors in place, which
    fails for gradients that are views (Shapley-CAM keeps them attached)."""
    if not isinstance(capture, PyramidCapture):
        capture.activations, capture.gradients = [], []
    capture.release()


def run_reference_pass(
    case: Case, model: nn.Module, x: torch.Tensor, targets, float64_formulas: bool = False
) -> dict:
    """Grad-CAM end to end, then every ONE_PASS class's own formulas on what it captured
    (``float64_formulas``: all of them on the captured tensors cast to float64)."""
    layer = model.get_submodule(case.layer)
    with quiet():
        cam = pgc.GradCAM(model, [layer], case.reshape("pgc"))
        if case.pyramid:
            release(cam.activations_and_grads)
            cam.activations_and_grads = PyramidCapture(model, layer, case.reshape("pgc"))
        try:
            maps = {"GradCAM": cam(x, targets)}
            captured = CapturedPass(
                list(cam.activations_and_grads.activations),
                list(cam.activations_and_grads.gradients),
            )
        finally:
            release(cam.activations_and_grads)
        if float64_formulas:
            captured = CapturedPass(
                [a.double() for a in captured.activations], [g.double() for g in captured.gradients]
            )
        for name in ONE_PASS[0 if float64_formulas else 1 :]:
            other = reference_class(name, case)(model, [layer], case.reshape("pgc"))
            release(other.activations_and_grads)
            other.activations_and_grads = captured
            np.random.seed(RANDOM_SEED)
            per_layer = other.compute_cam_per_layer(x, targets, False)
            maps[name] = other.aggregate_multi_layers(per_layer)
    return maps


RANDOM_SEED = 5  # RandomCAM: both libraries draw the weights from NumPy's global generator


def run_fastxai(name: str, case: Case, subject: Subject, targets=None) -> np.ndarray:
    layer = subject.model.get_submodule(case.layer)
    cam = SubclassCAM if name == "SubclassCAM" else getattr(compat, name)
    explainer = cam(subject.model, [layer], case.reshape("fastxai"))
    np.random.seed(RANDOM_SEED)
    if name == "FinerCAM":
        return explainer(subject.x)
    return explainer(subject.x, subject.targets["fastxai"] if targets is None else targets)


@pytest.fixture(scope="module")
def reference(subject):
    """``reference(name, case)`` -> pytorch-grad-cam's (float32, float64) maps, computed once."""
    cache = {}

    def run(name: str, case: Case, double: bool) -> np.ndarray:
        s = subject(case.arch)
        model, x = (s.truth_model, s.x.double()) if double else (s.reference_model, s.x)
        if double and name == "AblationCAM":
            # pytorch-grad-cam casts the scores to float32 even for a float64 model, and
            # (y - y_k) / y cancels digits: its float64 truth keeps them in float64
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(pgc_ablation_cam, "np", _NumPyInFloat64())
                return run_reference(name, case, model, x, s.targets["pgc"])
        if double and name == "KPCA_CAM" and not case.float64_truth:
            # the detector in float32, its kernel PCA in float64 (scikit-learn's float32 one is
            # off by up to 0.3 there)
            return run_reference("Float64KPCA", case, s.reference_model, s.x, s.targets["pgc"])
        if name in ONE_PASS:
            if (case, double) not in cache:
                if double and not case.float64_truth:
                    # the detector in float32, pytorch-grad-cam's formulas in float64
                    maps = run_reference_pass(
                        case, s.reference_model, s.x, s.targets["pgc"], float64_formulas=True
                    )
                else:
                    maps = run_reference_pass(case, model, x, s.targets["pgc"])
                cache[case, double] = maps
            return cache[case, double][name]
        return run_reference(name, case, model, x, s.targets["pgc"])

    def get(name: str, case: Case) -> tuple[np.ndarray, np.ndarray]:
        expected = run(name, case, double=False)
        if case.float64_truth or name in (*ONE_PASS, "KPCA_CAM"):
            return expected, run(name, case, double=True)
        return expected, expected

    return get


# --- the comparison -----------------------------------------------------------------------------


def tolerance_of(expected: np.ndarray, truth: np.ndarray, scale=1.0) -> np.ndarray:
    """Per image: twice pytorch-grad-cam's own float32 error against its float64 result, plus
    1e-5 of the maps' scale (1 for maps in [0, 1])."""
    axes = tuple(range(1, truth.ndim))
    return TOLERANCE * scale + 2 * np.abs(expected - truth).max(axis=axes)


def passes(candidate: np.ndarray, truth: np.ndarray, tolerance: np.ndarray) -> np.ndarray:
    """Per image: within the tolerance of the float64 reference."""
    axes = tuple(range(1, truth.ndim))
    return np.abs(candidate - truth).max(axis=axes) <= tolerance


def assert_matches(got, expected, truth, what, record, scale=1.0):
    assert got.dtype == np.float32 and got.shape == expected.shape == truth.shape, what
    tolerance = tolerance_of(expected, truth, scale)
    error = np.abs(got - truth).max(axis=tuple(range(1, truth.ndim)))
    record("max_abs_diff", float(error.max()))
    record("tolerance", float(tolerance.min()))
    assert passes(got, truth, tolerance).all(), f"{what}: {error} > {tolerance}"
    assert_rejects_wrong_maps(truth, tolerance, what)


def assert_rejects_wrong_maps(truth, tolerance, what):
    """The comparison fails the zero map, the best constant map and the inverted map."""
    axes = tuple(range(1, truth.ndim))
    low = truth.min(axis=axes, keepdims=True)
    high = truth.max(axis=axes, keepdims=True)
    wrong = {
        "zero": np.zeros_like(truth),
        "constant": np.broadcast_to((low + high) / 2, truth.shape),
        "inverted": low + high - truth,
    }
    for name, candidate in wrong.items():
        assert not passes(candidate, truth, tolerance).any(), f"{what}: {name} maps pass"


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "case"), MATRIX)
def test_class_matches_pytorch_grad_cam(subject, reference, record_property, name, case):
    got = run_fastxai(name, case, subject(case.arch))
    expected, truth = reference(name, case)
    assert_matches(got, expected, truth, f"{name} at {case.id}", record_property)


@pytest.mark.parametrize(
    ("name", "case"),
    [
        pytest.param(name, case, id=f"{name}-{case.id}")
        for case in CASES
        for name in EVERYWHERE + NOT_DETECTION
        if (name, case.id) in DEGENERATE
    ],
)
def test_degenerate_cases_agree(subject, reference, name, case):
    expected, truth = reference(name, case)
    got = run_fastxai(name, case, subject(case.arch))
    flat = np.ptp(truth, axis=(1, 2)) < 1e-6
    assert flat.any(), "listed as degenerate, but every reference map varies"
    assert (np.ptp(expected, axis=(1, 2))[flat] < 1e-6).all()
    assert (np.ptp(got, axis=(1, 2))[flat] < 1e-6).all()
    assert passes(got, truth, tolerance_of(expected, truth))[~flat].all()


class ZeroWeightsCAM(compat.BaseCAM):
    """An implementation that returns all-zero maps."""

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        return np.zeros(np.shape(grads)[:2])


class Negated:
    """A target whose score has the wrong sign: what a sign error in a method's gradient gives."""

    def __init__(self, target) -> None:
        self.target = target

    def __call__(self, model_output):
        return -self.target(model_output)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_comparison_rejects_wrong_implementations(subject, reference, case):
    """Against each case's Grad-CAM reference: an implementation returning zero maps and Grad-CAM
    with the score's sign flipped both fail the comparison, on every image."""
    s = subject(case.arch)
    expected, truth = reference("GradCAM", case)
    tolerance = tolerance_of(expected, truth)
    layer = s.model.get_submodule(case.layer)
    zero = ZeroWeightsCAM(s.model, [layer], case.reshape("fastxai"))(s.x, s.targets["fastxai"])
    assert not passes(zero, truth, tolerance).any()
    if case.pyramid:
        return  # fasterrcnn_reshape_transform takes the gradient's absolute value: no sign
    flipped = [Negated(t) for t in s.targets["fastxai"]]
    wrong_sign = compat.GradCAM(s.model, [layer], case.reshape("fastxai"))(s.x, flipped)
    assert not passes(wrong_sign, truth, tolerance).any()


FULLGRAD_ARCHS = [*CLASSIFIERS, "deeplabv3"]


def run_fullgrad(model, x, targets, eigen_smooth):
    with quiet():
        cam = pgc.FullGrad(model, [])
        try:
            return cam(x, targets, eigen_smooth=eigen_smooth)
        finally:
            cam.activations_and_grads.release()


@pytest.mark.parametrize("eigen_smooth", [False, True])
@pytest.mark.parametrize("arch", FULLGRAD_ARCHS)
def test_fullgrad_matches(subject, record_property, arch, eigen_smooth):
    """FullGrad uses every Conv2d / BatchNorm2d bias (no target layer); eigen_smooth's projection
    sign is fixed in the reference as fastxai fixes it. A detector calls its RPN head once per
    pyramid level, which pytorch-grad-cam's FullGrad cannot pair with the biases."""
    s = subject(arch)
    got = compat.FullGrad(s.model, [])(s.x, s.targets["fastxai"], eigen_smooth=eigen_smooth)
    targets = s.targets["pgc"]
    expected = run_fullgrad(copy.deepcopy(s.model), s.x, targets, eigen_smooth)
    truth = run_fullgrad(s.truth_model, s.x.double(), targets, eigen_smooth)
    assert_matches(got, expected, truth, f"FullGrad at {arch}", record_property)


def run_guided_backprop(model, x, category):
    with quiet():
        # pytorch-grad-cam swaps the ReLUs for its own modules and back for non-in-place ones
        return pgc.GuidedBackpropReLUModel(copy.deepcopy(model))(x.clone(), category)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_guided_backprop_matches(subject, record_property, arch, rank):
    """The input gradient through guided ReLUs, for the first image's top class (``None``) and its
    second class; a raw gradient, so the tolerance's 1e-5 is relative to its largest value."""
    s = subject(arch)
    x = s.x[:1]
    with torch.no_grad():
        category = None if rank == 0 else int(s.model(x)[0].argsort(descending=True)[rank])
    got = compat.GuidedBackpropReLUModel(s.model)(x, category)
    expected = run_guided_backprop(s.model, x, category)[None]
    truth = run_guided_backprop(s.truth_model, x.double(), category)[None]
    scale = np.abs(truth).max()
    assert_matches(got[None], expected, truth, f"guided backprop at {arch}", record_property, scale)
