"""fastxai.compat.utils.image and .reshape_transforms against pytorch-grad-cam 1.5.7's.

OpenCV (which pytorch-grad-cam uses for colour maps and resizing) is used here only as part of
the reference; fastxai computes the same results without it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastxai.compat.utils import image, reshape_transforms

pytest.importorskip("pytorch_grad_cam", reason="pip install grad-cam==1.5.7 (test extra)")
cv2 = pytest.importorskip("cv2", reason="pytorch-grad-cam's image helpers need OpenCV")
from pytorch_grad_cam.utils import image as ref_image  # noqa: E402
from pytorch_grad_cam.utils import reshape_transforms as ref_reshape  # noqa: E402

# cv2.resize computes its bilinear weights in its own float32 arithmetic; on maps in [0, 1] it
# differs from torch's interpolate by at most 1.9e-6 (measured, downsampling 56 -> 20 x 24;
# upsampling differs by at most 5e-7).
RESIZE_TOLERANCE = 1e-5


def _reference_jet() -> np.ndarray:
    levels = np.arange(256, dtype=np.uint8)[:, None]
    return cv2.applyColorMap(levels, cv2.COLORMAP_JET)[:, 0, ::-1].astype(int)  # RGB


def test_jet_table_matches_opencv_but_one_entry():
    """OpenCV stores JET as a float table; one entry (blue at level 159, 1.5/255 in the
    formula) rounds to 1 there instead of 2. Every other entry is equal."""
    difference = image._JET_RGB.astype(int) - _reference_jet()
    assert np.argwhere(difference).tolist() == [[159, 2]]
    assert difference[159, 2] == 1


@pytest.mark.parametrize("use_rgb", [False, True])
@pytest.mark.parametrize("image_weight", [0.5, 0.2])
def test_show_cam_on_image_matches(use_rgb, image_weight):
    rng = np.random.default_rng(0)
    img = rng.random((40, 48, 3), dtype=np.float32)
    mask = rng.random((40, 48), dtype=np.float32)
    expected = ref_image.show_cam_on_image(img, mask, use_rgb, image_weight=image_weight)
    got = image.show_cam_on_image(img, mask, use_rgb, image_weight=image_weight)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    off_table = np.uint8(255 * mask) == 159  # the one JET entry that differs by one level
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert (diff[~off_table] == 0).all()
    assert diff.max() <= 1
    assert expected.std() > 10  # a varied overlay, so equality is not trivial


def test_show_cam_on_image_matplotlib_colormap_and_bad_input():
    rng = np.random.default_rng(1)
    img = rng.random((8, 8, 3), dtype=np.float32)
    mask = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    got = image.show_cam_on_image(img, mask, use_rgb=True, colormap="viridis", image_weight=0.0)
    import matplotlib

    colours = matplotlib.colormaps["viridis"](np.uint8(255 * mask) / 255.0)[..., :3]
    cam = np.float32(np.rint(colours * 255)) / 255
    assert np.array_equal(got, np.uint8(255 * (cam / cam.max())))
    with pytest.raises(ValueError, match="colormap"):
        image.show_cam_on_image(img, mask, colormap=cv2.COLORMAP_HOT)
    with pytest.raises(ValueError, match="img"):
        image.show_cam_on_image(img * 255, mask)
    with pytest.raises(ValueError, match="image_weight"):
        image.show_cam_on_image(img, mask, image_weight=1.5)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_preprocess_image_matches(dtype):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (20, 30, 3)).astype(dtype)
    if dtype != np.uint8:
        img /= 255
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    expected = ref_image.preprocess_image(img, mean, std)
    got = image.preprocess_image(img, mean, std)
    assert got.dtype == expected.dtype and got.shape == expected.shape == (1, 3, 20, 30)
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(image.preprocess_image(img), ref_image.preprocess_image(img))


def test_deprocess_image_matches():
    img = np.random.default_rng(3).standard_normal((3, 16, 16)).astype(np.float32)
    expected = ref_image.deprocess_image(img)
    assert np.array_equal(image.deprocess_image(img), expected)
    assert expected.min() < expected.max()


@pytest.mark.parametrize(
    ("shape", "size"),
    [((3, 7, 7), (64, 64)), ((3, 14, 10), (33, 47)), ((2, 56, 56), (20, 24)), ((2, 5, 5), None)],
)
def test_scale_cam_image_matches(shape, size):
    cam = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    expected = ref_image.scale_cam_image(cam, size)
    got = image.scale_cam_image(cam, size)
    assert got.dtype == np.float32 and got.shape == expected.shape
    tolerance = 0.0 if size is None else RESIZE_TOLERANCE
    assert np.abs(got - expected).max() <= tolerance
    assert (expected.max(axis=(1, 2)) - expected.min(axis=(1, 2)) > 0.5).all()


def test_scale_accross_batch_and_channels_matches():
    t = np.random.default_rng(5).standard_normal((2, 3, 7, 9)).astype(np.float32)
    expected = ref_image.scale_accross_batch_and_channels(t, (30, 20))
    got = image.scale_accross_batch_and_channels(t, (30, 20))
    assert got.shape == expected.shape == (2, 3, 20, 30)
    assert np.abs(got - expected).max() <= RESIZE_TOLERANCE
    assert expected.std() > 0.1


def test_scale_cam_image_refuses_volumes():
    with pytest.raises(ValueError, match="cam"):
        image.scale_cam_image(np.ones((1, 4, 4, 4), np.float32), (8, 8, 8))


def test_token_reshapes_match():
    g = torch.Generator().manual_seed(6)
    vit = torch.randn(2, 1 + 14 * 14, 8, generator=g)
    assert torch.equal(
        reshape_transforms.vit_reshape_transform(vit), ref_reshape.vit_reshape_transform(vit)
    )
    swin = torch.randn(2, 7 * 7, 8, generator=g)
    assert torch.equal(
        reshape_transforms.swinT_reshape_transform(swin),
        ref_reshape.swinT_reshape_transform(swin),
    )
    small = torch.randn(2, 1 + 4 * 6, 8, generator=g)
    got = reshape_transforms.vit_reshape_transform(small, height=4, width=6)
    assert torch.equal(got, ref_reshape.vit_reshape_transform(small, height=4, width=6))
    assert got.shape == (2, 8, 4, 6)
    with pytest.raises(ValueError, match="height= and width="):
        reshape_transforms.vit_reshape_transform(small)


def test_fasterrcnn_reshape_matches():
    g = torch.Generator().manual_seed(7)
    pyramid = {
        "0": torch.randn(1, 4, 32, 40, generator=g),
        "1": torch.randn(1, 4, 16, 20, generator=g),
        "pool": torch.randn(1, 4, 4, 5, generator=g),
    }
    expected = ref_reshape.fasterrcnn_reshape_transform(pyramid)
    got = reshape_transforms.fasterrcnn_reshape_transform(pyramid)
    assert got.shape == expected.shape == (1, 12, 4, 5)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="pool"):
        reshape_transforms.fasterrcnn_reshape_transform({"0": pyramid["0"]})
