"""pytorch-grad-cam's documented usage patterns, run twice: as written, and with only the import
changed to ``fastxai.compat``.

Each pattern is the code of pytorch-grad-cam 1.5.7's README, ``cam.py`` or a tutorial (Grad-CAM on a
classifier, every method of ``cam.py``, smoothing, guided backprop, a ViT and a Swin with their
reshape transforms, semantic segmentation, object detection, Eigen-CAM on a detector, deep feature
factorization, the metrics, RefineCAM and SESS),
written once against a module prefix: ``pytorch_grad_cam`` or ``fastxai.compat``. The models are
torchvision's with random weights (the tutorials' timm and torch.hub models need downloads;
torchvision's ViT-B/16 and Swin-T take the same transforms). A pattern "works" when the fastxai run
finishes; ``max |Δ|`` compares each of its outputs with pytorch-grad-cam's, in the pattern's order
(maps in [0, 1], images in [0, 255], logits, metric values). Deliberate differences are listed in
``fastxai.compat``'s docstring (e.g. the Eigen-CAM SVD sign, the ablation value).

Run ``python benchmarks/pgc_patterns.py [--only NAME ...]`` (pytorch-grad-cam installed); the rows
go to ``benchmarks/results/pgc_patterns.json`` (with ``--only``: ``pgc_patterns-only.json``, so
that a partial rerun does not replace the full table; ``--results`` for another file), rendered by
``benchmarks/tables.py``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _results import RESULTS_DIR, Results, add_results_option

PGC = "pytorch_grad_cam"
FASTXAI = "fastxai.compat"
COLUMNS = [
    ("pattern", "pattern"),
    ("source", "from"),
    ("works", "works"),
    ("diff", "max abs diff vs pgc, per output"),
    ("note", "note"),
    ("seconds", "s", "{:.0f}"),
]


@dataclass
class Pattern:
    name: str
    source: str
    run: Callable[[str], list[np.ndarray]]
    note: str = ""  # a documented difference that the row shows


def lib(prefix: str, module: str = "") -> object:
    return importlib.import_module(f"{prefix}.{module}" if module else prefix)


def seeded(fn: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fn().eval()


def image(size: int = 224, seed: int = 1) -> tuple[np.ndarray, torch.Tensor]:
    """A float RGB image in [0, 1] (H, W, 3) and its normalised tensor (1, 3, H, W)."""
    rgb = np.random.default_rng(seed).random((size, size, 3), dtype=np.float32)
    tensor = (torch.from_numpy(rgb).permute(2, 0, 1)[None] - 0.45) / 0.225
    return rgb, tensor


MODELS: dict[str, nn.Module] = {}


def model(name: str) -> nn.Module:
    """A fresh copy of a seeded torchvision model: pytorch-grad-cam changes the models it
    explains (mode, swapped ReLUs), so each run gets its own."""
    if name not in MODELS:
        MODELS[name] = seeded(lambda: getattr(torchvision.models, name)(num_classes=1000))
    return copy.deepcopy(MODELS[name])


# ------------------------------------------------------------------------------------------
# README: Grad-CAM of class 281 on resnet50's last block, shown on the image
# ------------------------------------------------------------------------------------------
def readme(prefix: str) -> list[np.ndarray]:
    cams = lib(prefix)
    targets_mod = lib(prefix, "utils.model_targets")
    image_mod = lib(prefix, "utils.image")
    net = model("resnet50")
    rgb, input_tensor = image()
    targets = [targets_mod.ClassifierOutputTarget(281)]
    with cams.GradCAM(model=net, target_layers=[net.layer4[-1]]) as cam:
        grayscale_cam = cam(input_tensor=input_tensor, targets=targets)[0, :]
        visualization = image_mod.show_cam_on_image(rgb, grayscale_cam, use_rgb=True)
        outputs = cam.outputs
    return [grayscale_cam, visualization.astype(np.float32), outputs.detach().numpy()]


# ------------------------------------------------------------------------------------------
# cam.py: every method of its table on resnet18's layer4 (resnet50 in cam.py; 18 keeps the
# perturbation methods short), default targets (top-1)
# ------------------------------------------------------------------------------------------
CAM_PY_METHODS = [
    "GradCAM",
    "HiResCAM",
    "ScoreCAM",
    "GradCAMPlusPlus",
    "AblationCAM",
    "XGradCAM",
    "EigenCAM",
    "EigenGradCAM",
    "LayerCAM",
    "FullGrad",
    "GradCAMElementWise",
    "KPCA_CAM",
    "ShapleyCAM",
    "FinerCAM",
]
# pytorch-grad-cam 1.5.7's classes that its cam.py table does not list, run the same way
MORE_METHODS = ["FEM", "SegEigenCAM"]
# The SVD-sign methods: fastxai fixes the sign and warns once; svd_sign="numpy" takes pgc's
SIGNED = ["EigenCAM", "EigenGradCAM"]
SIGN_NOTE = "SVD sign fixed (warned); the svd_sign='numpy' row below gives pgc's"


def cam_py(
    method: str, aug_smooth: bool = False, eigen_smooth: bool = False, pgc_sign: bool = False
):
    """``pgc_sign``: fastxai with ``svd_sign="numpy"`` (pytorch-grad-cam's SVD sign)."""

    def run(prefix: str) -> list[np.ndarray]:
        cams = lib(prefix)
        net = model("resnet18")
        _, input_tensor = image(size=160)
        sign = {"svd_sign": "numpy"} if pgc_sign and prefix == FASTXAI else {}
        with getattr(cams, method)(model=net, target_layers=[net.layer4], **sign) as cam:
            cam.batch_size = 32
            smoothing = {"aug_smooth": True} if aug_smooth else {}
            if eigen_smooth:
                smoothing["eigen_smooth"] = True
            grayscale = cam(input_tensor=input_tensor, targets=None, **smoothing)
        return [grayscale]

    return run


def guided_backprop(prefix: str) -> list[np.ndarray]:
    cams = lib(prefix)
    image_mod = lib(prefix, "utils.image")
    net = model("resnet18")
    _, input_tensor = image(size=160)
    # cam.py's order: the CAM, then guided backprop (pytorch-grad-cam's guided backprop returns a
    # view of input_tensor.grad, which a later CAM call on the same tensor would add to)
    with cams.GradCAM(model=net, target_layers=[net.layer4]) as cam:
        grayscale = cam(input_tensor=input_tensor, targets=None)[0]
    gb_model = cams.GuidedBackpropReLUModel(model=net, device="cpu")
    gb = gb_model(input_tensor, target_category=None)
    cam_mask = np.stack([grayscale] * 3, axis=-1)
    cam_gb = image_mod.deprocess_image(cam_mask * gb)
    return [gb, image_mod.deprocess_image(gb).astype(np.float32), cam_gb.astype(np.float32)]


# ------------------------------------------------------------------------------------------
# Tutorials: vision transformers (vit_example.py, swinT_example.py)
# ------------------------------------------------------------------------------------------
def vit(prefix: str) -> list[np.ndarray]:
    cams = lib(prefix)
    transforms = lib(prefix, "utils.reshape_transforms")
    net = model("vit_b_16")
    _, input_tensor = image()
    layer = net.encoder.layers[-1].ln_1
    with cams.GradCAM(
        model=net, target_layers=[layer], reshape_transform=transforms.vit_reshape_transform
    ) as cam:
        return [cam(input_tensor=input_tensor, targets=None, eigen_smooth=False)]


def swin(prefix: str) -> list[np.ndarray]:
    cams = lib(prefix)
    net = model("swin_t")
    _, input_tensor = image()
    layer = net.features[-1][-1].norm1  # (N, 7, 7, C): channels last

    def reshape_transform(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.permute(0, 3, 1, 2)

    with cams.GradCAM(model=net, target_layers=[layer], reshape_transform=reshape_transform) as cam:
        return [cam(input_tensor=input_tensor, targets=None)]


# ------------------------------------------------------------------------------------------
# Tutorial: Class Activation Maps for semantic segmentation
# ------------------------------------------------------------------------------------------
class SegmentationModelOutputWrapper(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def segmentation(prefix: str) -> list[np.ndarray]:
    cams = lib(prefix)
    targets_mod = lib(prefix, "utils.model_targets")
    torch.manual_seed(0)
    net = SegmentationModelOutputWrapper(
        torchvision.models.segmentation.deeplabv3_resnet50(
            weights=None, weights_backbone=None, num_classes=21
        ).eval()
    )
    _, input_tensor = image(size=160)
    output = net(input_tensor)
    normalized_masks = torch.nn.functional.softmax(output, dim=1).cpu()
    category = 12  # "dog" in the tutorial
    mask = normalized_masks[0].argmax(axis=0).detach().numpy()
    mask_float = np.float32(mask == mask.max())  # the tutorial's class; random weights: the top
    targets = [targets_mod.SemanticSegmentationTarget(category, mask_float)]
    with cams.GradCAM(model=net, target_layers=[net.model.backbone.layer4]) as cam:
        return [cam(input_tensor=input_tensor, targets=targets)[0, :]]


# ------------------------------------------------------------------------------------------
# Tutorials: object detection (Faster R-CNN, and Eigen-CAM on its backbone)
# ------------------------------------------------------------------------------------------
def detector() -> tuple[nn.Module, torch.Tensor, list, list]:
    torch.manual_seed(0)
    net = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0, min_size=224, max_size=224
    ).eval()
    rgb, _ = image()
    input_tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    with torch.no_grad():
        outputs = net(input_tensor)[0]
    keep = outputs["scores"].argsort(descending=True)[:3]
    return net, input_tensor, outputs["labels"][keep].tolist(), outputs["boxes"][keep].numpy()


def detection_with(method: str) -> Callable[[str], list[np.ndarray]]:
    """The detection tutorial's CAM of Faster R-CNN's backbone for its top-3 boxes."""

    def run(prefix: str) -> list[np.ndarray]:
        cams = lib(prefix)
        targets_mod = lib(prefix, "utils.model_targets")
        transforms = lib(prefix, "utils.reshape_transforms")
        net, input_tensor, labels, boxes = detector()
        targets = [targets_mod.FasterRCNNBoxScoreTarget(labels=labels, bounding_boxes=boxes)]
        with getattr(cams, method)(
            net, [net.backbone], reshape_transform=transforms.fasterrcnn_reshape_transform
        ) as cam:
            return [cam(input_tensor, targets=targets)[0, :]]

    return run


def detection_ablation(prefix: str) -> list[np.ndarray]:
    """The Faster R-CNN tutorial's Ablation-CAM (``AblationLayerFasterRCNN``); 2 % of the
    pyramid's channels (the most and the least object-covering) keep the run short."""
    cams = lib(prefix)
    targets_mod = lib(prefix, "utils.model_targets")
    transforms = lib(prefix, "utils.reshape_transforms")
    ablation = lib(prefix, "ablation_layer")
    net, input_tensor, labels, boxes = detector()
    targets = [targets_mod.FasterRCNNBoxScoreTarget(labels=labels, bounding_boxes=boxes)]
    with cams.AblationCAM(
        net,
        [net.backbone],
        reshape_transform=transforms.fasterrcnn_reshape_transform,
        ablation_layer=ablation.AblationLayerFasterRCNN(),
        ratio_channels_to_ablate=0.02,
    ) as cam:
        return [cam(input_tensor, targets=targets)[0, :]]


# ------------------------------------------------------------------------------------------
# Tutorial: deep feature factorization (concepts, their maps and the classifier on them)
# ------------------------------------------------------------------------------------------
def deep_feature_factorization(prefix: str) -> list[np.ndarray]:
    factorization = lib(prefix, "feature_factorization.deep_feature_factorization")
    net = model("resnet50")
    _, input_tensor = image(size=160)
    dff = factorization.DeepFeatureFactorization(
        model=net, target_layer=net.layer4, computation_on_concepts=net.fc
    )
    concepts, batch_explanations, concept_outputs = dff(input_tensor, 4)
    return [concepts, batch_explanations[0], concept_outputs]


def run_dff_picture(prefix: str) -> list[np.ndarray]:
    """``run_dff_on_image`` on a classifier with Hugging Face style class names (its default
    ``reshape_transform`` fails in pytorch-grad-cam, so ``None`` is passed, and its default
    colours call ``matplotlib.cm.get_cmap``, gone since matplotlib 3.9: given back here)."""
    import types

    import matplotlib
    from PIL import Image

    if not hasattr(matplotlib.cm, "get_cmap"):
        matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
    factorization = lib(prefix, "feature_factorization.deep_feature_factorization")
    net = model("resnet50")
    net.config = types.SimpleNamespace(id2label={i: f"class {i}" for i in range(1000)})
    rgb, input_tensor = image(size=160)
    picture = Image.fromarray(np.uint8(rgb * 255))
    with matplotlib.rc_context():
        result = factorization.run_dff_on_image(
            net, net.layer4, net.fc, picture, input_tensor[0], None, 4, 2
        )
    return [result.astype(np.float32)]


# ------------------------------------------------------------------------------------------
# pytorch-grad-cam 1.5.7's meta-methods: RefineCAM (one CAM per layer, multiplied) and SESS
# (sliding windows over several scales); small settings keep SESS short
# ------------------------------------------------------------------------------------------
def refine_cam(prefix: str) -> list[np.ndarray]:
    cams = lib(prefix)
    net = model("resnet18")
    _, input_tensor = image(size=160)
    cam = cams.RefineCAM(model=net, target_layers=[net.layer2, net.layer3, net.layer4])
    return [cam(input_tensor, targets=None)]


def sess(prefix: str) -> list[np.ndarray]:
    cams = lib(prefix)
    net = model("resnet18")
    _, input_tensor = image(size=128)
    with cams.SESS(model=net, target_layers=[net.layer4], num_scales=3) as cam:
        return [cam(input_tensor, targets=None)]


# ------------------------------------------------------------------------------------------
# Tutorial: metrics (CAM-multiplied confidence, ROAD)
# ------------------------------------------------------------------------------------------
def metrics(prefix: str) -> list[np.ndarray]:
    cams = lib(prefix)
    targets_mod = lib(prefix, "utils.model_targets")
    cam_mult = lib(prefix, "metrics.cam_mult_image")
    road = lib(prefix, "metrics.road")
    net = model("resnet18")
    _, input_tensor = image(size=64)
    targets = [targets_mod.ClassifierOutputTarget(281)]
    with cams.GradCAM(model=net, target_layers=[net.layer4]) as cam:
        grayscale = cam(input_tensor=input_tensor, targets=targets)
    confidence = cam_mult.CamMultImageConfidenceChange()(input_tensor, grayscale, targets, net)
    road_score = road.ROADMostRelevantFirst(percentile=80)(input_tensor, grayscale, targets, net)
    return [np.asarray(confidence), np.asarray(road_score)]


PATTERNS = [
    Pattern("readme-gradcam", "README", readme, "overlay: OpenCV's JET table rounds one entry"),
    *[
        Pattern(f"cam.py-{m}", "cam.py", cam_py(m), SIGN_NOTE if m in SIGNED else "")
        for m in CAM_PY_METHODS
    ],
    *[Pattern(f"class-{m}", "cam.py usage", cam_py(m)) for m in MORE_METHODS],
    Pattern("cam.py-aug+eigen-smooth", "cam.py", cam_py("GradCAM", True, True), SIGN_NOTE),
    *[Pattern(f"cam.py-{m} svd_sign='numpy'", "cam.py", cam_py(m, pgc_sign=True)) for m in SIGNED],
    Pattern(
        "cam.py-aug+eigen-smooth svd_sign='numpy'",
        "cam.py",
        cam_py("GradCAM", True, True, pgc_sign=True),
    ),
    Pattern("cam.py-guided-backprop", "cam.py", guided_backprop),
    Pattern("vit", "vit_example.py", vit),
    Pattern("swin", "swinT_example.py", swin),
    Pattern("segmentation", "tutorial", segmentation),
    Pattern("detection-eigencam", "tutorial", detection_with("EigenCAM")),
    Pattern("detection-gradcam", "tutorial", detection_with("GradCAM")),
    Pattern("detection-ablationcam", "tutorial", detection_ablation),
    Pattern(
        "deep-feature-factorization",
        "tutorial",
        deep_feature_factorization,
        "concepts of order 10: 1e-5 relative, pgc's own float32 error",
    ),
    Pattern(
        "run-dff-on-image",
        "tutorial",
        run_dff_picture,
        "1 grey level at 25 of 230,400 values: OpenCV's HSV rounding",
    ),
    Pattern("refine-cam", "refine_cam.py", refine_cam),
    Pattern("sess", "sess.py", sess),
    Pattern("metrics", "tutorial", metrics),
]


def run_pattern(pattern: Pattern) -> tuple[str, str, str]:
    np.random.seed(0)
    torch.manual_seed(0)
    try:
        want = pattern.run(PGC)
    except Exception as exc:  # the pattern itself fails under pytorch-grad-cam
        return "pgc fails", "", f"{type(exc).__name__}: {exc}"[:80]
    np.random.seed(0)
    torch.manual_seed(0)
    try:
        got = pattern.run(FASTXAI)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        return "no", "", f"{type(exc).__name__}: {exc}"[:80]
    diffs = [
        float(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)).max())
        for g, w in zip(got, want, strict=True)
    ]
    return "yes", " / ".join(f"{d:.2g}" for d in diffs), ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="pattern names (substring match)")
    add_results_option(parser)
    args = parser.parse_args()
    if args.only and args.results is True:
        args.results = RESULTS_DIR / "pgc_patterns-only.json"
    results = Results(__file__, args.results)
    results.table("main", COLUMNS)
    failures = 0
    for pattern in PATTERNS:
        if args.only and not any(s in pattern.name for s in args.only):
            continue
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            works, diff, note = run_pattern(pattern)
        note = note or pattern.note
        failures += works == "no"
        row = {
            "pattern": pattern.name,
            "source": pattern.source,
            "works": works,
            "diff": diff,
            "note": note,
            "seconds": time.perf_counter() - start,
        }
        results.add("main", row)
        print(row, file=sys.stderr, flush=True)
    results.finish()
    print(results.markdown("main"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
