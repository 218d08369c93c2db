"""Deep Feature Factorization against pytorch-grad-cam 1.5.7, whose NMF is scikit-learn's
``NMF(init="random", random_state=0)``: deterministic, so fastxai's float64 coordinate descent is
compared value by value.

On the same float64 activations the two factorisations agree to rounding (1e-9 relative). On a
float32 model the reference is pytorch-grad-cam run in float64, within 1e-5 (relative to the
largest value) plus pytorch-grad-cam's own float32 error against it.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from fastxai.compat.feature_factorization import DeepFeatureFactorization, dff
from fastxai.compat.feature_factorization.nmf import nmf

pgc_dff = pytest.importorskip(
    "pytorch_grad_cam.feature_factorization.deep_feature_factorization",
    reason="pip install grad-cam==1.5.7 (test extra)",
)

TOLERANCE = 1e-5


def reference(model, x, k, head):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's ConvergenceWarning after 200 sweeps
        dff_ = pgc_dff.DeepFeatureFactorization(model, model.layer4, computation_on_concepts=head)
        concepts, maps, outputs = dff_(x, k)
        dff_.activations_and_grads.release()
    return concepts, np.stack(maps), outputs


def assert_close(got, expected, truth, scale, what):
    tolerance = TOLERANCE * scale + np.abs(expected - truth).max()
    error = np.abs(got - truth).max()
    assert error <= tolerance, f"{what}: {error:.2e} > {tolerance:.2e}"


@pytest.mark.parametrize("k", [4, 6])
def test_dff_matches_pytorch_grad_cam(tv_model, k):
    model = tv_model("resnet18")
    model64 = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    concepts, maps, outputs = DeepFeatureFactorization(
        model, model.layer4, computation_on_concepts=model.fc
    )(x, k)
    expected = reference(model, x, k, model.fc)
    truth = reference(model64, x.double(), k, lambda t: model64.fc(t.double()))
    assert concepts.shape == (512, k) and concepts.dtype == np.float32
    assert len(maps) == 2 and maps[0].shape == (k, 96, 96) and outputs.shape == (k, 1000)
    scale = np.abs(truth[0]).max()
    assert_close(concepts, expected[0], truth[0], scale, "concepts")
    assert_close(np.stack(maps), expected[1], truth[1], 1.0, "maps")
    assert_close(outputs, expected[2], truth[2], np.abs(truth[2]).max(), "concept outputs")
    # not vacuous: the maps vary, and the concepts are not all one vector
    assert (truth[1].max(axis=(2, 3)) - truth[1].min(axis=(2, 3)) > 0.5).all()
    assert np.abs(truth[0] - truth[0][:, :1]).max() > 0.1 * scale


def test_factorisation_equals_scikit_learns_on_the_same_input():
    """The same float64 activations: the same sweeps, so the same factors up to rounding."""
    rng = np.random.default_rng(3)
    activations = np.maximum(rng.standard_normal((2, 64, 5, 5)), 0) - 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        concepts, maps = pgc_dff.dff(activations.copy(), n_components=5)
    got_concepts, got_maps = dff(activations.copy(), n_components=5)
    assert np.abs(got_concepts - concepts).max() <= 1e-9 * np.abs(concepts).max()
    assert np.abs(got_maps - maps).max() <= 1e-9 * np.abs(maps).max()
    assert (got_maps >= 0).all() and maps.std() > 0.01


def test_bad_input():
    with pytest.raises(ValueError, match="n_components must be an int >= 1, got 0"):
        nmf(torch.ones(3, 4), 0)
    with pytest.raises(ValueError, match="x: NMF needs non-negative values"):
        nmf(-torch.ones(3, 4), 2)
