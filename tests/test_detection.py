"""Object detectors: a torchvision Faster R-CNN returns a list of per-image dicts and its
backbone yields a dict of feature maps; ``targets`` callables and ``reshape_transform`` make
them explainable, as in pytorch-grad-cam's detection tutorial.

References are written out here: a forward hook on the backbone, autograd of the summed box
scores, pytorch-grad-cam's reshape transform, and the Grad-CAM / Eigen-CAM formulas (Eigen-CAM's
sign fixed as fastxai documents it: the largest-magnitude value positive).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

import fastxai
from fastxai import compat
from fastxai.compat.utils.model_targets import FasterRCNNBoxScoreTarget
from fastxai.compat.utils.reshape_transforms import fasterrcnn_reshape_transform


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0, num_classes=5
    ).eval()
    x = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)[0]
    keep = out["scores"].argsort(descending=True)[:3]
    targets = [FasterRCNNBoxScoreTarget(out["labels"][keep], out["boxes"][keep])]
    return model, x, targets


def hooked(model, x: Tensor, targets, with_gradient: bool):
    """The backbone's dict and, with a gradient, d(sum of target scores)/d(each feature map)."""
    kept = {}

    def keep(_m, _i, output):
        kept.update({k: v.detach().requires_grad_(with_gradient) for k, v in output.items()})
        return dict(kept)

    handle = model.backbone.register_forward_hook(keep)
    try:
        with torch.set_grad_enabled(with_gradient):
            outputs = model(x)
    finally:
        handle.remove()
    if not with_gradient:
        return kept, None
    score = sum(t(o) for t, o in zip(targets, outputs, strict=True)).sum()
    grads = torch.autograd.grad(score, list(kept.values()), allow_unused=True)
    grads = [
        torch.zeros_like(v) if g is None else g for v, g in zip(kept.values(), grads, strict=True)
    ]
    return kept, dict(zip(kept, grads, strict=True))


def scaled(raw: Tensor, size: int) -> Tensor:
    m = raw.clamp_min(0)
    m = (m - m.amin((1, 2), keepdim=True)) / (
        m.amax((1, 2), keepdim=True) - m.amin((1, 2), keepdim=True) + 1e-7
    )
    m = F.interpolate(m[:, None], (size, size), mode="bilinear", align_corners=False)[:, 0]
    return (m - m.amin((1, 2), keepdim=True)) / (
        m.amax((1, 2), keepdim=True) - m.amin((1, 2), keepdim=True) + 1e-7
    )


def test_gradcam_of_a_detector_matches_hooks_and_autograd(detector):
    model, x, targets = detector
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.fx cannot trace the detector: hook fallback
        got = fastxai.gradcam(
            model, x, "backbone", targets, reshape_transform=fasterrcnn_reshape_transform
        )
    acts, grads = hooked(model, x, targets, with_gradient=True)
    a = fasterrcnn_reshape_transform(acts).detach()
    g = fasterrcnn_reshape_transform(grads)
    raw = (g.mean((2, 3), keepdim=True) * a).sum(1)
    assert raw.abs().max() > 0, "the box scores should reach the backbone"
    # 1e-5: float32 sums in another order over ~1000 channels of the concatenated FPN levels
    torch.testing.assert_close(got.raw, raw, atol=1e-5 * raw.abs().max().item(), rtol=0)
    torch.testing.assert_close(got.maps, scaled(raw, 160), atol=1e-5, rtol=0)
    assert isinstance(got.logits, list) and set(got.logits[0]) == {"boxes", "labels", "scores"}
    assert got.targets.tolist() == [-1]


def test_compat_eigencam_of_a_detector_is_the_fixed_sign_first_component(detector):
    model, x, targets = detector
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with compat.EigenCAM(model, [model.backbone], fasterrcnn_reshape_transform) as cam:
            got = cam(x, targets=targets)
    acts, _ = hooked(model, x, targets, with_gradient=False)
    a = fasterrcnn_reshape_transform(acts)[0].double()
    rows = a.flatten(1).T
    rows = rows - rows.mean(0)
    _, _, vt = torch.linalg.svd(rows, full_matrices=False)
    projection = (rows @ vt[0]).reshape(a.shape[1:])
    if projection.flatten()[projection.abs().argmax()] < 0:
        projection = -projection
    expected = scaled(projection[None].float(), 160)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=0)


def test_a_detector_needs_callable_targets_and_a_reshape_transform(detector):
    model, x, targets = detector
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"^targets: the model returns a list of 1 per-image"):
            fastxai.gradcam(
                model, x, "backbone", None, reshape_transform=fasterrcnn_reshape_transform
            )
        with pytest.raises(ValueError, match=r"layer 'backbone' yields OrderedDict"):
            fastxai.gradcam(model, x, "backbone", targets)
