"""Deep Feature Factorization's pictures against pytorch-grad-cam 1.5.7 (and OpenCV, which it
uses for the HSV round trip).

OpenCV converts HSV to RGB in two ways: its vectorised code (each row's first multiple of 32
pixels here) truncates, its scalar code (the rest of the row) rounds, one level apart. fastxai
truncates everywhere, so it equals pytorch-grad-cam exactly on rows whose width is a multiple of
32 and within that one level elsewhere: the tolerance is OpenCV's own disagreement.
"""

from __future__ import annotations

import copy
import types

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from fastxai.compat import run_dff_on_image
from fastxai.compat.utils.image import create_labels_legend, show_factorization_on_image
from fastxai.compat.utils.opencv_hsv import hsv_to_rgb, rgb_to_hsv

cv2 = pytest.importorskip("cv2", reason="pytorch-grad-cam's OpenCV (test extra)")
pgc_image = pytest.importorskip("pytorch_grad_cam.utils.image", reason="grad-cam==1.5.7")
pgc_dff = pytest.importorskip("pytorch_grad_cam.feature_factorization.deep_feature_factorization")

# OpenCV 4 rounds in its vectorised HSV -> RGB code too: one level apart from OpenCV 5's
EXACT = int(cv2.__version__.split(".")[0]) >= 5


@pytest.fixture
def reference_colormaps(monkeypatch):
    """pytorch-grad-cam's default colours call matplotlib.cm.get_cmap, removed in matplotlib
    3.9; give it back for the reference (matplotlib's own lookup, same colour map)."""
    monkeypatch.setattr(matplotlib.cm, "get_cmap", matplotlib.colormaps.get_cmap, raising=False)


def reference(function, *args, **kwargs):
    """pytorch-grad-cam sets matplotlib's legend font size globally; keep that inside."""
    with matplotlib.rc_context():
        return function(*args, **kwargs)


def every_colour(levels_first: int) -> np.ndarray:
    grid = np.meshgrid(np.arange(levels_first), np.arange(256), np.arange(256), indexing="ij")
    return np.stack(grid, -1).reshape(-1, 256, 3).astype(np.uint8)  # rows of 256 pixels


def test_hsv_conversions_equal_opencvs_on_every_8_bit_input():
    rgb = every_colour(256)[::3]  # a third of all colours, every hue and value
    assert np.array_equal(rgb_to_hsv(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))
    hsv = every_colour(180)
    expected = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(int)
    error = np.abs(hsv_to_rgb(hsv).astype(int) - expected)
    assert error.max() <= (0 if EXACT else 1)
    assert expected.std() > 50  # not vacuous


@pytest.mark.parametrize(("height", "width", "k"), [(64, 64, 4), (29, 40, 3), (40, 70, 7)])
@pytest.mark.parametrize("labelled", [False, True])
def test_show_factorization_matches_pytorch_grad_cam(
    reference_colormaps, height, width, k, labelled
):
    rng = np.random.default_rng(height)
    img = rng.random((height, width, 3))
    maps = rng.random((k, height, width)).astype(np.float32)
    labels = [f"concept {i}:0.{i}\nother:0.0{i}" for i in range(k)] if labelled else None
    given = maps.copy()
    font_size = matplotlib.rcParams["legend.fontsize"]
    got = show_factorization_on_image(img, given, image_weight=0.4, concept_labels=labels)
    expected = reference(
        pgc_image.show_factorization_on_image,
        img,
        maps.copy(),
        image_weight=0.4,
        concept_labels=labels,
    )
    assert got.dtype == np.uint8 and got.shape == expected.shape == (
        height,
        width * (1 + labelled),
        3,
    )
    error = np.abs(got.astype(int) - expected)
    exact = EXACT and width % 32 == 0
    assert error.max() <= (0 if exact else 1), error.max()
    assert (error == 0).mean() > 0.95
    assert np.array_equal(given, maps) and matplotlib.rcParams["legend.fontsize"] == font_size
    # not vacuous: every concept's colour shows, and the legend is drawn
    assert len(np.unique(expected[:, :width].reshape(-1, 3), axis=0)) > 100
    if labelled:
        assert expected[:, width:].std() > 10


def test_show_factorization_with_given_colours():
    rng = np.random.default_rng(1)
    img = rng.random((32, 32, 3)).astype(np.float32)
    maps = rng.random((3, 32, 32)).astype(np.float32)
    colours = [np.array([1.0, 0.2, 0.1]), (0.1, 0.9, 0.3, 1.0), [0.3, 0.3, 1.0]]
    got = show_factorization_on_image(img, maps, colours)
    expected = pgc_image.show_factorization_on_image(img, maps.copy(), colours)
    assert np.array_equal(got, expected) if EXACT else np.abs(got - expected.astype(int)).max() <= 1


def test_labels_legend_matches_pytorch_grad_cam():
    scores = np.random.default_rng(2).random((4, 10))
    labels = {i: f"name {i}, alias {i}, third, fourth" for i in range(10)}
    got = create_labels_legend(scores, labels, top_k=3)
    assert got == pgc_image.create_labels_legend(scores, labels, top_k=3)
    assert got[0].count("\n") == 2 and "fourth" not in got[0]


def hugging_face_like(tv_model):
    model = copy.deepcopy(tv_model("resnet18"))
    names = {i: f"class {i}, kind {i % 7}, group, extra" for i in range(1000)}
    model.config = types.SimpleNamespace(id2label=names)
    return model


def test_run_dff_on_image_matches_pytorch_grad_cam(tv_model, reference_colormaps):
    model = hugging_face_like(tv_model)
    rng = np.random.default_rng(3)
    picture = Image.fromarray((rng.random((96, 96, 3)) * 255).astype(np.uint8))
    x = (torch.from_numpy(np.array(picture)).permute(2, 0, 1) / 255 - 0.45) / 0.225
    got = run_dff_on_image(model, model.layer4, model.fc, picture, x, None, 3, 2)
    # pytorch-grad-cam's default reshape_transform is a typing object that fails when called
    expected = reference(
        pgc_dff.run_dff_on_image, model, model.layer4, model.fc, picture, x, None, 3, 2
    )
    assert got.shape == expected.shape == (96, 288, 3) and got.dtype == np.uint8
    # the concept maps agree to 1e-5 (tests/test_compat_dff.py): the same 8-bit levels but
    # where a value sits that close to a level's edge
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert np.array_equal(got[:, :96], np.array(picture))
    assert expected[:, 96:192].std() > 10 and expected[:, 192:].std() > 10


def test_bad_input(tv_model):
    model = tv_model("resnet18")
    picture = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match=r"model: .*model.config.id2label"):
        run_dff_on_image(model, model.layer4, model.fc, picture, torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"img_tensor must be a torch.Tensor \(C, H, W\)"):
        run_dff_on_image(hugging_face_like(tv_model), model.layer4, model.fc, picture, None)
    maps = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"img: expected \(H, W, 3\) with \(H, W\) = \(8, 8\)"):
        show_factorization_on_image(np.zeros((8, 9, 3)), maps)
    with pytest.raises(ValueError, match="explanations: expected"):
        show_factorization_on_image(np.zeros((8, 8, 3)), maps[0])
    with pytest.raises(ValueError, match="concept_labels: expected 2 labels"):
        show_factorization_on_image(np.zeros((8, 8, 3)), maps, concept_labels=["a"])
