"""fastxai.compat.utils.svd_on_activations and .find_layers against pytorch-grad-cam 1.5.7's.

The projections run the same NumPy/LAPACK calls on the same arrays as pytorch-grad-cam, so they
must be equal bit for bit (an SVD's arbitrary sign included); the layer finders must return the
same module objects in the same order, and the replacements must leave the same model.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torchvision
from torch import nn

from fastxai.compat.utils import find_layers, get_2d_projection, svd_on_activations

pytest.importorskip("pytorch_grad_cam", reason="pip install grad-cam==1.5.7 (test extra)")
from pytorch_grad_cam.utils import find_layers as ref_find
from pytorch_grad_cam.utils import svd_on_activations as ref_svd


def _activations(dtype: type, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    batch = rng.standard_normal((3, 16, 7, 9)).astype(dtype)
    batch[0] += 2.0 * rng.standard_normal((1, 7, 9)).astype(dtype)  # one strong component
    batch[1, 3, 2, 4] = np.nan  # read as 0 by both
    return batch


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["get_2d_projection", "get_2d_projection_with_sign_correction"])
def test_projections_equal_pytorch_grad_cam_bit_for_bit(dtype, name):
    batch = _activations(dtype)
    before = batch.copy()
    got = getattr(svd_on_activations, name)(batch)
    expected = getattr(ref_svd, name)(batch)
    assert got.dtype == np.float32 and got.shape == (3, 7, 9)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(batch, before)  # the caller's array is not changed
    # not the trivial answers: each map spreads over both signs around the centre
    assert all(m.min() < 0 < m.max() for m in got)


def test_the_sign_correction_flips_exactly_the_maps_whose_negative_side_dominates():
    batch = _activations(np.float64, seed=3)
    plain = get_2d_projection(batch)
    corrected = svd_on_activations.get_2d_projection_with_sign_correction(batch)
    for p, c in zip(plain, corrected, strict=True):
        flip = abs(p.min()) > abs(p.max())
        np.testing.assert_array_equal(c, -p if flip else p)


def test_the_kernel_projection_equals_pytorch_grad_cam():
    pytest.importorskip("sklearn", reason="the kernel projection needs scikit-learn")
    batch = _activations(np.float64, seed=1)
    for kernel, gamma in (("sigmoid", None), ("rbf", 0.05)):
        np.testing.assert_array_equal(
            svd_on_activations.get_2d_projection_kernel(batch, kernel, gamma),
            ref_svd.get_2d_projection_kernel(batch, kernel, gamma),
        )


def test_a_batch_of_the_wrong_rank_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^activation_batch: expected a \(N, C, H, W\) array"):
        get_2d_projection(np.zeros((16, 7, 9)))


def _shared_model() -> nn.Module:
    shared = nn.ReLU()
    return nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.Sequential(nn.Conv2d(4, 4, 1), shared))


@pytest.mark.parametrize("make", [lambda: torchvision.models.resnet18(), _shared_model])
def test_finders_return_pytorch_grad_cams_modules_in_its_order(make):
    model = make()
    for types in ([nn.Conv2d], [nn.BatchNorm2d, nn.ReLU], [nn.Module]):
        got = find_layers.find_layer_types_recursive(model, types)
        expected = ref_find.find_layer_types_recursive(model, types)
        assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected, strict=True))
    assert find_layers.find_layer_types_recursive(model, [nn.Conv2d])  # something to find

    def wide(layer):
        return isinstance(layer, nn.Conv2d) and layer.out_channels >= 4

    got = find_layers.find_layer_predicate_recursive(model, wide)
    expected = ref_find.find_layer_predicate_recursive(model, wide)
    assert got and all(a is b for a, b in zip(got, expected, strict=True))


def test_replacements_leave_the_model_pytorch_grad_cam_leaves():
    model = torchvision.models.resnet18()
    target = model.layer2[1].conv2
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    new = nn.Identity()
    assert find_layers.replace_layer_recursive(ours, ours.layer2[1].conv2, new)
    assert ref_find.replace_layer_recursive(theirs, theirs.layer2[1].conv2, new)
    assert ours.layer2[1].conv2 is new and str(ours) == str(theirs)
    assert not find_layers.replace_layer_recursive(ours, target, new)  # not in this copy
    assert model.layer2[1].conv2 is target  # the original is untouched

    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    find_layers.replace_all_layer_type_recursive(ours, nn.ReLU, nn.GELU())
    ref_find.replace_all_layer_type_recursive(theirs, nn.ReLU, nn.GELU())
    assert str(ours) == str(theirs) and "ReLU" not in str(ours) and "GELU" in str(ours)
