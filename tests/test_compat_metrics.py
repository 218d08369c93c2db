"""fastxai.compat.metrics against pytorch-grad-cam 1.5.7's metrics on resnet18 (random weights).

Scores are compared within 1e-5 plus pytorch-grad-cam's own float32 error: its float32 scores
against the float64 model run on the same (its own) perturbed images. ROAD's noise is drawn from
torch's global generator in both, so both run after the same ``torch.manual_seed``; fastxai's
imputation solves the same linear system by conjugate gradients instead of a sparse LU
(measured: at most 1.2e-7 from pytorch-grad-cam's imputed pixels, within its own float32 error
against the float64 solution of its system).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import run_without_extension

from fastxai import compat
from fastxai.compat.metrics import arcc, cam_mult_image, road
from fastxai.compat.utils.model_targets import ClassifierOutputTarget

pytest.importorskip("pytorch_grad_cam", reason="pip install grad-cam==1.5.7 (test extra)")
from pytorch_grad_cam import GradCAM as ReferenceGradCAM
from pytorch_grad_cam.metrics import arcc as ref_arcc
from pytorch_grad_cam.metrics import cam_mult_image as ref_cam_mult_image
from pytorch_grad_cam.metrics import road as ref_road

TOLERANCE = 1e-5
TARGETS = [ClassifierOutputTarget(3), ClassifierOutputTarget(7)]
SEED = 5


@pytest.fixture
def setup(tv_model, images):
    """resnet18, two 32 x 32 images and their Grad-CAM maps at layer2 (4 x 4, upsampled)."""
    model = tv_model("resnet18")
    x = images(2, 32)
    cams = compat.GradCAM(model, [model.layer2])(x)
    assert (cams.max(axis=(1, 2)) - cams.min(axis=(1, 2)) > 0.5).all()
    return model, x, cams


def seeded(metric, *args, **kwargs):
    torch.manual_seed(SEED)
    return metric(*args, **kwargs)


def reference_error(metric, model, x, cams, transform=lambda s: s):
    """|pytorch-grad-cam's float32 scores - the float64 model on its own perturbed images|."""
    scores, perturbed = seeded(
        ref_cam_mult_image.PerturbationConfidenceMetric.__call__,
        metric,
        x,
        cams,
        TARGETS,
        model,
        return_visualization=True,
    )
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        before, after = model64(x.double()), model64(perturbed.double())
    truth = np.array([float(t(a) - t(b)) for t, a, b in zip(TARGETS, after, before, strict=True)])
    return np.abs(transform(scores) - transform(truth))


METRICS = [
    (cam_mult_image, ref_cam_mult_image, "CamMultImageConfidenceChange", (), None),
    (cam_mult_image, ref_cam_mult_image, "DropInConfidence", (), lambda s: np.maximum(-s, 0)),
    (cam_mult_image, ref_cam_mult_image, "IncreaseInConfidence", (), lambda s: np.float32(s > 0)),
    (road, ref_road, "ROADMostRelevantFirst", (80,), None),
    (road, ref_road, "ROADMostRelevantFirst", (30,), None),
    (road, ref_road, "ROADLeastRelevantFirst", (20,), None),
    (road, ref_road, "ROADLeastRelevantFirst", ("auto",), None),
    (road, ref_road, "ROADMostRelevantFirst", ("auto",), None),
]


@pytest.mark.parametrize(("module", "reference", "name", "args", "transform"), METRICS)
def test_metric_matches_pytorch_grad_cam(setup, module, reference, name, args, transform):
    model, x, cams = setup
    got = seeded(getattr(module, name)(*args), x, cams, TARGETS, model)
    expected = seeded(getattr(reference, name)(*args), x, cams, TARGETS, model)
    own_error = reference_error(
        getattr(reference, name)(*args), model, x, cams, transform or (lambda s: s)
    )
    assert got.dtype == np.float32 and got.shape == expected.shape == (2,)
    assert (np.abs(got - expected) <= TOLERANCE + own_error).all(), (got, expected, own_error)
    if transform is None:  # the raw score changes are far from 0, so zeros would fail
        assert (np.abs(expected) > 1e-3).all(), expected


def test_road_noise_follows_the_seed(setup):
    """Another seed moves the scores by far more than the tolerance: the comparison above sees
    the noise, drawn as pytorch-grad-cam draws it."""
    model, x, cams = setup
    metric = road.ROADMostRelevantFirst(50)
    torch.manual_seed(SEED)
    first = metric(x, cams, TARGETS, model)
    torch.manual_seed(SEED + 1)
    other = metric(x, cams, TARGETS, model)
    assert np.abs(first - other).max() > 100 * TOLERANCE


def test_averages_and_combined_match(setup):
    model, x, cams = setup
    percentiles = [20, 50, 80]
    for name in ("ROADMostRelevantFirstAverage", "ROADLeastRelevantFirstAverage", "ROADCombined"):
        got = seeded(getattr(road, name)(percentiles), x, cams, TARGETS, model)
        expected = seeded(getattr(ref_road, name)(percentiles), x, cams, TARGETS, model)
        assert np.abs(got - expected).max() <= 10 * TOLERANCE, name
        assert np.abs(expected).max() > 1e-3, name


def test_arcc_matches(setup):
    model, x, cams = setup
    mine = compat.GradCAM(model, [model.layer2])
    got = seeded(arcc.ARCC(mine, [30, 70]), x, cams, TARGETS, model)
    base = ReferenceGradCAM(model, [model.layer2])
    expected = seeded(ref_arcc.ARCC(base, [30, 70]), x, cams, TARGETS, model)
    coherency = ref_arcc.Coherency()(x, cams, TARGETS, model, base)
    base.activations_and_grads.release()
    assert np.abs(got - expected).max() <= 10 * TOLERANCE
    assert expected.max() > 0.05  # the second image's ROAD term clips to 0
    # the parts: Coherency is far from 0.5 (what uncorrelated maps give)
    got_coherency = arcc.Coherency()(x, cams, TARGETS, model, mine)
    assert np.abs(got_coherency - coherency).max() <= TOLERANCE
    assert (np.abs(coherency - 0.5) > 0.05).all()
    assert np.allclose(arcc.Complexity()(cams), ref_arcc.Complexity()(cams), atol=1e-7)


@pytest.mark.parametrize(("size", "removed"), [(32, 0.5), (64, 0.9), (16, 1.0), (48, "hole")])
def test_imputer_matches_pytorch_grad_cam(size, removed):
    """Each imputed pixel is within pytorch-grad-cam's own float32 error (against the float64
    solution of its own system) plus one float32 rounding; with no known pixel both give the
    noise alone. The same seed gives the same noise."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    g = torch.Generator().manual_seed(size)
    img = torch.randn(3, size, size, generator=g)
    if removed == "hole":  # one region away from the borders: only a window is solved
        mask = torch.ones(size, size)
        mask[10:21, 5:31] = 0
    else:
        mask = (torch.rand(size, size, generator=g) >= removed).float()
    got = seeded(road.NoisyLinearImputer(), img, mask)
    expected = seeded(ref_road.NoisyLinearImputer(), img, mask)
    assert torch.equal(got[:, mask > 0], img[:, mask > 0])
    assert (got - img).abs().max() > 1e-3
    if not mask.any():
        assert torch.equal(got, expected)
        return
    missing = mask.numpy().ravel() == 0
    system, rhs = ref_road.NoisyLinearImputer.setup_sparse_system(
        mask.numpy(), img.double().numpy(), ref_road.neighbors_weights
    )
    exact = spsolve(csc_matrix(system), rhs).T
    reference = ref_road.NoisyLinearImputer(noise=0.0)(img, mask).numpy().reshape(3, -1)
    own_error = np.abs(reference[:, missing] - exact).max()
    ulp = np.spacing(np.float32(np.abs(exact).max()))
    noiseless = road.NoisyLinearImputer(noise=0.0)(img, mask).numpy().reshape(3, -1)
    assert np.abs(noiseless[:, missing] - exact).max() <= own_error + ulp
    # both solutions lie within own_error + ulp of the exact one; adding the noise rounds each
    assert (got - expected).abs().max() <= 2 * own_error + 3 * ulp


def test_otsu_threshold_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    from fastxai.compat.metrics._otsu import otsu_foreground

    rng = np.random.default_rng(0)
    for trial in range(200):
        smooth = np.uint8(rng.random((20, 24)) ** (1 + trial % 4) * 255)
        _, expected = cv2.threshold(smooth, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        assert np.array_equal(otsu_foreground(smooth), expected), trial


def test_model_is_left_unchanged(tv_model, images):
    model = copy.deepcopy(tv_model("resnet18")).train()
    x = images(2, 32)
    cams = compat.GradCAM(model, [model.layer2])(x)
    buffers = [b.clone() for b in model.buffers()]
    road.ROADMostRelevantFirst(50)(x, cams, TARGETS, model)
    cam_mult_image.DropInConfidence()(x, cams, TARGETS, model)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_bad_input(setup):
    model, x, cams = setup
    metric = cam_mult_image.CamMultImageConfidenceChange()
    with pytest.raises(TypeError, match="targets: expected a list of callables"):
        metric(x, cams, None, model)
    with pytest.raises(ValueError, match="targets: expected 1 or 2 targets"):
        metric(x, cams, TARGETS * 2, model)
    with pytest.raises(ValueError, match=r"cams must have shape \(N, H, W\)"):
        metric(x, cams[:, :16], TARGETS, model)
    with pytest.raises(ValueError, match="percentile must be in"):
        road.ROADMostRelevantFirst(120)
    # one target scores every image (pytorch-grad-cam would score only the first)
    one = metric(x, cams, TARGETS[:1], model)
    both = metric(x, cams, TARGETS[:1] * 2, model)
    assert np.array_equal(one, both)


def test_metrics_import_neither_scipy_nor_opencv():
    script = (
        "import sys, fastxai.compat.metrics.road, fastxai.compat.metrics.arcc; "
        "bad = {'scipy', 'cv2', 'pytorch_grad_cam'} & set(sys.modules); assert not bad, bad"
    )
    result = run_without_extension(script)
    assert result.returncode == 0, result.stderr
