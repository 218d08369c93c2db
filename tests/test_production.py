"""Production paths: torch.compile without graph breaks, mixed precision and channels_last, the
stream API, sharded dataset jobs (resume after a kill, 2-process gloo) and explain-dataset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fastxai
from fastxai.io import read_meta, read_shards
from fastxai.nn import Explainer
from fastxai.stream import explain_dataset, explain_stream

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "fastxai-inductor"))
REPO_ROOT = Path(__file__).resolve().parent.parent


class TinyResNet(nn.Module):
    """A residual block (so the split carries a value past the layer), BatchNorm, a linear
    head: every capture path of a torchvision ResNet at a fraction of the trace time."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.features = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.block(h)
        return self.fc(self.pool(self.features(h)).flatten(1))


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyResNet()
    with torch.no_grad():
        bn = model.stem[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def batch(n: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------

COMPILE_CASES = {
    "gradcam": lambda m, x: fastxai.gradcam(m, x, "features"),
    "gradcampp": lambda m, x: fastxai.gradcampp(m, x, "features", [0, 1, 2]),
    "xgradcam": lambda m, x: fastxai.xgradcam(m, x, "features"),
    "layercam": lambda m, x: fastxai.layercam(m, x, ["block", "features"]),
    "hirescam": lambda m, x: fastxai.hirescam(m, x, "block"),
    "cam": lambda m, x: fastxai.cam(m, x, "features"),
    "eigencam": lambda m, x: fastxai.eigencam(m, x, "features"),
    "ablationcam": lambda m, x: fastxai.ablationcam(m, x, "features"),
    "scorecam": lambda m, x: fastxai.scorecam(m, x, "features"),
    "gradcam tensor targets": lambda m, x: fastxai.gradcam(m, x, "block", torch.tensor([4, 0, 2])),
    "gradcam tft": lambda m, x: fastxai.gradcam(m, x, "features", tft=True),
    "gradcampp tft percentile": lambda m, x: fastxai.gradcampp(
        m, x, "features", 1, tft=True, tft_options={"mode": "percentile", "mask": "soft"}
    ),
    "tft": lambda m, x: fastxai.tft(m, x, fastxai.gradcam(m, x, "features").maps, 3),
}


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_fullgraph_trace_has_no_graph_break_and_equals_eager(case):
    """Dynamo traces the whole call as one graph (fullgraph=True raises on any graph break);
    the eager backend runs that graph, so the values must equal eager mode's."""
    torch._dynamo.reset()
    model, x = tiny(), batch()
    fn = COMPILE_CASES[case]
    eager = fn(model, x)  # also builds the split, as a first eager call does
    compiled = torch.compile(lambda images: fn(model, images), fullgraph=True, backend="eager")
    got = compiled(x)
    torch.testing.assert_close(got.maps, eager.maps, atol=1e-6, rtol=0)
    assert torch.equal(got.targets, eager.targets)
    if eager.tau is not None:
        assert torch.equal(got.tau, eager.tau) and torch.equal(got.mask, eager.mask)


def test_inductor_explainer_with_tft_matches_eager():
    """The real compiler (Inductor) on the Explainer module with TFT, from the first call."""
    torch._dynamo.reset()
    model, x = tiny(1), batch(4, 16, seed=1)
    explainer = Explainer(model, "features", method="gradcam", tft=True)
    compiled = torch.compile(explainer, fullgraph=True)
    logits, got = compiled(x)
    _, eager = explainer(x)
    torch.testing.assert_close(logits, eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        got.extras["original_maps"], eager.extras["original_maps"], atol=1e-5, rtol=0
    )
    assert torch.equal(got.tau, eager.tau)
    # maps = original * mask: equal wherever no pixel sits within rounding of the chosen tau
    torch.testing.assert_close(got.maps, eager.maps, atol=1e-5, rtol=0)


def test_inductor_functional_layercam_tensor_targets_matches_eager():
    torch._dynamo.reset()
    model, x = tiny(2), batch(2, 20, seed=2)
    targets = torch.tensor([3, 1])
    eager = fastxai.layercam(model, x, "block", targets)
    compiled = torch.compile(
        lambda images, t: fastxai.layercam(model, images, "block", t), fullgraph=True
    )
    got = compiled(x, targets)
    torch.testing.assert_close(got.maps, eager.maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.raw, eager.raw, atol=1e-5, rtol=1e-5)


def test_compiling_an_unprepared_layer_says_how_to_prepare():
    torch._dynamo.reset()
    model = tiny(3)  # a fresh model: no eager call has split it yet
    compiled = torch.compile(
        lambda x: fastxai.gradcam(model, x, "features").maps, fullgraph=True, backend="eager"
    )
    with pytest.raises(Exception, match=r"prepare\(model, layer\)"):
        compiled(batch())
    fastxai.capture.prepare(model, "features")
    torch._dynamo.reset()
    torch.testing.assert_close(
        compiled(batch()), fastxai.gradcam(model, batch(), "features").maps, atol=1e-6, rtol=0
    )


def test_eager_value_checks_still_hold_for_tensor_targets_and_thresholds():
    model, x = tiny(), batch()
    with pytest.raises(ValueError, match=r"targets: class 7 is outside \[0, 5\)"):
        fastxai.gradcam(model, x, "features", torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match=r"targets has 2 entries for a batch of 3"):
        fastxai.gradcam(model, x, "features", torch.tensor([0, 1]))
    maps = fastxai.gradcam(model, x, "features").maps
    with pytest.raises(ValueError, match=r"thresholds must lie in \[0, 1\]"):
        fastxai.tft(model, x, maps, thresholds=torch.tensor([0.2, 1.5]))
    with pytest.raises(ValueError, match=r"thresholds must lie in \[0, 1\], got nan"):
        fastxai.tft(model, x, maps, thresholds=[0.2, float("nan")])


# --------------------------------------------------------------------------------------------
# Mixed precision and channels_last
# --------------------------------------------------------------------------------------------

# bfloat16 keeps 8 bits of mantissa: activations and gradients carry ~0.4% relative error, and
# a min-max normalised map moves by at most a few 1e-2 where two peaks nearly tie (measured on
# resnet18 at 64 px: max 7e-3, mean 1e-3).
BF16_MAX_ERROR = 5e-2
BF16_MEAN_ERROR = 5e-3


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "layercam", "eigencam"])
def test_autocast_bfloat16_maps_agree_with_float32(tv_model, images, method):
    model, x = tv_model("resnet18"), images(3, 64)
    reference = fastxai.METHODS[method](model, x, "layer4", [1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fastxai.METHODS[method](model, x, "layer4", [1, 2, 3])
    assert mixed.maps.dtype == torch.float32 and mixed.logits.dtype == torch.float32
    error = (mixed.maps - reference.maps).abs()
    assert error.max() < BF16_MAX_ERROR and error.mean() < BF16_MEAN_ERROR
    assert error.max() > 0  # the model passes really ran in bfloat16
    torch.testing.assert_close(mixed.logits, reference.logits, atol=0.1, rtol=0.05)


def test_autocast_tft_is_consistent_and_ablation_scores_stay_float32(tv_model, images):
    model, x = tv_model("resnet18"), images(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tuned = fastxai.gradcam(model, x, "layer4", [1, 2], tft=True)
        ablation = fastxai.ablationcam(model, x, "layer4", [1, 2])
    assert torch.equal(tuned.maps, tuned.extras["original_maps"] * tuned.mask)
    assert tuned.rpi.dtype == torch.float32
    assert ablation.extras["weights"].dtype == torch.float32


@pytest.mark.parametrize("method", ["gradcam", "layercam", "ablationcam"])
def test_channels_last_model_and_input_give_the_same_maps(tv_model, images, method):
    import copy

    model, x = tv_model("resnet18"), images(2, 64)
    reference = fastxai.METHODS[method](model, x, "layer3", [5, 6])
    converted = copy.deepcopy(model).to(memory_format=torch.channels_last)
    got = fastxai.METHODS[method](
        converted, x.contiguous(memory_format=torch.channels_last), "layer3", [5, 6]
    )
    # Different convolution kernels, so float32 rounding differs; nothing else may.
    tolerance = 5e-4 if method == "ablationcam" else 2e-5
    torch.testing.assert_close(got.maps, reference.maps, atol=tolerance, rtol=0)


# --------------------------------------------------------------------------------------------
# Streams and dataset jobs
# --------------------------------------------------------------------------------------------


def test_stream_of_single_images_and_dataloader_equal_one_batched_call():
    model, x = tiny(), batch(7, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    whole = fastxai.gradcam(model, x, "features", labels, tft=True)
    singles = [(x[i], int(labels[i])) for i in range(7)]
    got = list(
        explain_stream(
            model, singles, "features", batch_size=3, targets="labels", tft=True, progress=False
        )
    )
    assert [len(e) for e in got] == [3, 3, 1]
    assert torch.cat([e.extras["index"] for e in got]).tolist() == list(range(7))
    torch.testing.assert_close(torch.cat([e.maps for e in got]), whole.maps, atol=1e-5, rtol=0)
    assert torch.equal(torch.cat([e.tau for e in got]), whole.tau)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=2)
    regrouped = list(explain_stream(model, loader, "features", batch_size=4, progress=False))
    assert [len(e) for e in regrouped] == [4, 3]
    top1 = fastxai.gradcam(model, x, "features")
    torch.testing.assert_close(torch.cat([e.maps for e in regrouped]), top1.maps, atol=1e-5, rtol=0)


def test_stream_rejects_bad_arguments_by_name():
    model = tiny()
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        next(explain_stream(model, [batch(1)], "features", batch_size=0))
    with pytest.raises(ValueError, match="method must be one of"):
        next(explain_stream(model, [batch(1)], "features", method="gradcamm"))
    with pytest.raises(ValueError, match="targets='labels' but the data has no labels"):
        next(explain_stream(model, [batch(1)], "features", targets="labels", progress=False))
    with pytest.raises(ValueError, match=r"data: images must have shape"):
        next(explain_stream(model, [torch.zeros(16, 16)], "features", progress=False))


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int, kill_at: int | None = None) -> None:
        self.x = batch(n, 16, seed=5)
        self.kill_at = kill_at

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == self.kill_at:
            os.kill(os.getpid(), 9)  # SIGKILL: no cleanup, no flush, as a node failure
        return self.x[i], i % 5


def test_dataset_job_writes_shards_equal_to_a_batched_call(tmp_path):
    model, data = tiny(), Images(10)
    written = explain_dataset(
        model,
        data,
        "features",
        tmp_path,
        batch_size=4,
        shard_size=3,
        tft=True,
        targets="labels",
        maps_dtype=torch.float32,
        progress=False,
    )
    assert written == 10
    stored = read_shards(tmp_path)
    reference = fastxai.gradcam(model, data.x, "features", torch.arange(10) % 5, tft=True)
    assert stored["index"].tolist() == list(range(10))
    torch.testing.assert_close(stored["maps"], reference.maps, atol=1e-5, rtol=0)
    assert torch.equal(stored["mask"], reference.mask)
    assert torch.equal(stored["tau"], reference.tau.float())
    assert read_meta(tmp_path)["method"] == "gradcam"
    # A finished job has nothing left to do; another job's settings are refused.
    assert (
        explain_dataset(
            model,
            data,
            "features",
            tmp_path,
            batch_size=4,
            shard_size=3,
            tft=True,
            targets="labels",
            maps_dtype=torch.float32,
            progress=False,
        )
        == 0
    )
    with pytest.raises(ValueError, match="holds results of another job"):
        explain_dataset(model, data, "features", tmp_path, method="gradcampp", progress=False)


JOB = dict(batch_size=2, shard_size=2, tft=True, maps_dtype=torch.float32, progress=False)
JOB_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_production import JOB, Images, tiny
from fastxai.stream import explain_dataset
kill_at = int(sys.argv[2]) if len(sys.argv) > 2 else None
print("written", explain_dataset(tiny(), Images(12, kill_at), "features", sys.argv[1], **JOB))
"""


def single_process_job(out: Path) -> dict[str, torch.Tensor]:
    assert explain_dataset(tiny(), Images(12), "features", out, **JOB) == 12
    return read_shards(out)


def _run_job(script: Path, *args: str, launcher: list[str] | None = None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [*(launcher or [sys.executable]), str(script), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_job_killed_midway_resumes_with_only_the_missing_items(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB_SCRIPT.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "shards"
    killed = _run_job(script, str(out), "7")
    assert killed.returncode == -9, killed.stderr
    done = read_shards(out)["index"].tolist()
    assert done == [0, 1, 2, 3, 4, 5]  # the shard holding items 6, 7 was never completed
    resumed = _run_job(script, str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "written 6" in resumed.stdout
    a, b = read_shards(out), single_process_job(tmp_path / "fresh")
    assert a["index"].tolist() == list(range(12))
    torch.testing.assert_close(a["maps"], b["maps"], atol=1e-5, rtol=0)
    assert torch.equal(a["tau"], b["tau"]) and torch.equal(a["targets"], b["targets"])


def test_two_gloo_processes_give_the_single_process_output(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB_SCRIPT.format(tests=str(Path(__file__).parent)))
    double = tmp_path / "double"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    result = _run_job(script, str(double), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name[:5] for p in double.glob("rank*.pt")) == ["rank0"] * 3 + ["rank1"] * 3
    a, b = single_process_job(tmp_path / "single"), read_shards(double)
    assert b["index"].tolist() == list(range(12))
    torch.testing.assert_close(b["maps"], a["maps"], atol=1e-5, rtol=0)
    assert torch.equal(b["targets"], a["targets"]) and torch.equal(b["tau"], a["tau"])


def test_explain_dataset_command_on_an_image_folder(tmp_path, capsys):
    from PIL import Image

    from fastxai.cli import main

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    out = tmp_path / "out"
    argv = [
        "explain-dataset",
        str(tmp_path / "images"),
        "--out",
        str(out),
        "--model",
        "resnet18",
        "--layer",
        "layer3",
        "--batch-size",
        "3",
        "--targets",
        "labels",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "4 images explained" in capsys.readouterr().out
    stored = read_shards(out)
    assert stored["targets"].tolist() == [0, 0, 1, 1]
    assert stored["maps"].shape == (4, 224, 224) and stored["maps"].dtype == torch.float16
    assert float(stored["maps"].amax()) == 1.0
    assert main([*argv[:2], "--out", str(out), "--batch-size", "0"]) == 2
    assert "--batch-size: must be >= 1" in capsys.readouterr().err
