"""pytorch-grad-cam's Faster R-CNN Ablation-CAM recipe with only the import changed:
``fasterrcnn_resnet50_fpn``, the backbone as target layer, ``fasterrcnn_reshape_transform``,
``AblationLayerFasterRCNN``, ``FasterRCNNBoxScoreTarget`` and ``ratio_channels_to_ablate``.

Random weights, 96 px images and few proposals keep it short; the detector returns boxes
(``box_score_thresh=0``), whose top three are the targets. Maps are compared with
pytorch-grad-cam 1.5.7's within 1e-5, as the other Ablation-CAM comparisons.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
import torchvision

from fastxai import compat
from fastxai.compat.ablation_layer import AblationLayerFasterRCNN
from fastxai.compat.utils.model_targets import FasterRCNNBoxScoreTarget
from fastxai.compat.utils.reshape_transforms import fasterrcnn_reshape_transform

pgc = pytest.importorskip("pytorch_grad_cam", reason="pip install grad-cam==1.5.7 (test extra)")
from pytorch_grad_cam import ablation_layer as ref_ablation_layer  # noqa: E402
from pytorch_grad_cam.utils import model_targets as ref_targets  # noqa: E402
from pytorch_grad_cam.utils import reshape_transforms as ref_transforms  # noqa: E402

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=5,
        box_score_thresh=0.0,
        min_size=96,
        max_size=96,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=20,
        box_detections_per_img=10,
    ).eval()
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = model(x)
    boxes = []
    for output in outputs:
        assert len(output["boxes"]) > 0, "the random-weight detector should find boxes"
        keep = output["scores"].argsort(descending=True)[:3]
        boxes.append((output["labels"][keep].tolist(), output["boxes"][keep].numpy()))
    return model, x, boxes


def test_faster_rcnn_recipe_matches(detector):
    model, x, boxes = detector
    ratio = 0.02  # 25 + 25 of the pyramid's 1280 channels per image
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        expected = pgc.AblationCAM(
            model,
            [model.backbone],
            reshape_transform=ref_transforms.fasterrcnn_reshape_transform,
            ablation_layer=ref_ablation_layer.AblationLayerFasterRCNN(),
            ratio_channels_to_ablate=ratio,
        )(x, targets=[ref_targets.FasterRCNNBoxScoreTarget(*b) for b in boxes])
    before = [(m, m.training) for m in model.modules()]
    targets = [FasterRCNNBoxScoreTarget(labels, box) for labels, box in boxes]
    with compat.AblationCAM(
        model,
        [model.backbone],
        reshape_transform=fasterrcnn_reshape_transform,
        ablation_layer=AblationLayerFasterRCNN(),
        ratio_channels_to_ablate=ratio,
    ) as cam:
        got = cam(x, targets=targets)
        assert len(cam.outputs) == 2 and len(cam.outputs[0]["boxes"]) > 0
    assert got.dtype == np.float32 and got.shape == expected.shape == (2, 96, 96)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert (expected.max(axis=(1, 2)) - expected.min(axis=(1, 2)) > 0.5).all()
    # the model is left as it was: no hooks, same modes, no gradients
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert [(m, m.training) for m in model.modules()] == before
    assert all(p.grad is None for p in model.parameters())


def test_pyramid_ablation_needs_a_dict_layer(tv_model, images):
    model = tv_model("resnet18")
    cam = compat.AblationCAM(model, [model.layer3], ablation_layer=AblationLayerFasterRCNN())
    with pytest.raises(ValueError, match="ablation_layer: AblationLayerFasterRCNN ablates a layer"):
        cam(images(1, 32), targets=[compat.utils.model_targets.ClassifierOutputTarget(1)])
    assert not any(m._forward_hooks for m in model.modules())
