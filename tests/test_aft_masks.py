"""Dataset-scale TFT masks: the values, resumption after an exception and after SIGKILL."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from fastxai import gradcam
from fastxai.aft import FashionCNN, generate_masks, load_targets, pool_mask
from fastxai.io import read_shards

REPO_ROOT = Path(__file__).resolve().parent.parent


def problem(n: int = 40) -> tuple[nn.Module, torch.Tensor]:
    """A deterministic tiny CNN and images (the killed subprocess rebuilds the same ones)."""
    torch.manual_seed(0)
    model = FashionCNN(width=4).eval()
    images = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, images


def slowed(model: nn.Module, delay: float) -> nn.Module:
    """A copy of ``model`` that sleeps before each classifier call, so a job can be killed
    mid-way. (A hook, not a wrapper's ``forward``: fastxai runs the model through its torch.fx
    split, which calls the submodules but not the Python of an outer ``forward``.)"""
    copy_ = copy.deepcopy(model)
    copy_.fc.register_forward_pre_hook(lambda _m, _i: time.sleep(delay))
    return copy_


def failing(model: nn.Module, fail_at: int) -> nn.Module:
    """A copy of ``model`` whose classifier raises on its call number ``fail_at``."""
    copy_ = copy.deepcopy(model)
    calls = [0]

    def count(_module: nn.Module, _inputs: object) -> None:
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("simulated crash")

    copy_.fc.register_forward_pre_hook(count)
    return copy_


def generate(model: nn.Module, images: torch.Tensor, root: Path, **options) -> object:
    options = {"layer": "layer3", **options}
    options.setdefault("batch_size", 4)
    options.setdefault("shard_size", 8)
    return generate_masks(model, images, root, progress=False, **options)


def test_targets_are_pooled_tft_masks(tmp_path) -> None:
    model, images = problem(12)
    job = generate(model, images, tmp_path, keep_masks=True, batch_size=5, shard_size=7)
    assert (job.computed, job.skipped) == (12, 0)
    fields = load_targets(tmp_path)
    direct = gradcam(model, images, "layer3", tft=True)
    assert torch.equal(fields["index"], torch.arange(12))
    assert torch.equal(fields["mask"], direct.mask)
    assert torch.equal(fields["tau"], direct.tau.float())
    assert torch.equal(fields["cls"], direct.targets)
    # avg pooling: the kept fraction of each 4x4 cell of the 16x16 mask.
    expected = direct.mask.float().view(12, 4, 4, 4, 4).mean((2, 4))
    torch.testing.assert_close(fields["target"], expected)
    assert float(fields["tau"].max()) > 0  # some images were muted: not a trivial mask
    nearest = pool_mask(direct.mask, (4, 4), "nearest")
    assert torch.equal(nearest, direct.mask[:, ::4, ::4].float())


def test_percentile_tft_options_and_nearest_pool(tmp_path) -> None:
    """``tft_options={"mode": "percentile"}`` reaches TFT: each image keeps all its positive
    pixels (tau* = 0) or exactly ``HW - floor(tau* HW)`` of them with tau* in 0.1..0.9; ``nearest``
    targets are the mask at every 4th pixel."""
    model, images = problem(12)
    options = {"mode": "percentile"}
    generate(model, images, tmp_path, keep_masks=True, pool="nearest", tft_options=options)
    fields = load_targets(tmp_path)
    direct = gradcam(model, images, "layer3", tft=True, tft_options=options)
    assert torch.equal(fields["mask"], direct.mask)
    assert torch.equal(fields["tau"], direct.tau.float())
    assert torch.equal(fields["target"], direct.mask[:, ::4, ::4].float())
    tau = fields["tau"].double()
    muted = tau > 0
    assert bool(muted.any())  # some image was muted: the check below is not vacuous
    ladder = torch.arange(1, 10, dtype=torch.float64) / 10
    assert bool(torch.isclose(tau[muted, None], ladder[None]).any(1).all())
    kept = fields["mask"].flatten(1).sum(1)
    assert torch.equal(kept[muted], 256 - torch.floor(tau[muted] * 256).long())
    positive = (direct.extras["original_maps"] > 0).flatten(1).sum(1)
    assert torch.equal(kept[~muted], positive[~muted])


def test_resume_after_an_exception_equals_an_uninterrupted_run(tmp_path) -> None:
    model, images = problem()
    generate(model, images, tmp_path / "full")
    full = read_shards(tmp_path / "full")
    # Two classifier calls per batch of 4 (CAM, TFT ladder): call 9 starts the fifth batch.
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate(failing(model, fail_at=9), images, tmp_path / "crash")
    partial = read_shards(tmp_path / "crash")
    assert 0 < len(partial["index"]) < len(images)
    with pytest.raises(ValueError, match="rerun the mask job"):
        load_targets(tmp_path / "crash")
    job = generate(model, images, tmp_path / "crash")
    assert job.skipped == len(partial["index"]) and job.computed + job.skipped == len(images)
    resumed = load_targets(tmp_path / "crash")
    finished = generate(model, images, tmp_path / "crash")  # a rerun of a finished job
    assert (finished.computed, finished.skipped) == (0, len(images))
    for name, value in full.items():
        assert torch.equal(resumed[name], value), name


def test_another_job_in_the_same_folder_is_refused(tmp_path) -> None:
    model, images = problem(4)
    generate(model, images, tmp_path)
    with pytest.raises(ValueError, match="another job"):
        generate(model, images, tmp_path, method="gradcampp")


def test_shards_intact_after_sigkill(tmp_path) -> None:
    """Kill a mask job (SIGKILL, no cleanup) once it wrote a shard; the rerun completes it."""
    _, images = problem()
    root = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    child = subprocess.Popen(
        [sys.executable, __file__, str(root)],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(root.glob("rank0-*.pt")) and time.monotonic() < deadline:
            assert child.poll() is None, child.stdout.read().decode()
            time.sleep(0.05)
        still_running = child.poll() is None
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert still_running, "the job finished before it could be killed"
    written = read_shards(root)  # every shard on disk loads: none is half-written
    assert 0 < len(written["index"]) < len(images)
    model, _ = problem()
    job = generate(model, images, root)
    assert job.skipped == len(written["index"])
    generate(model, images, tmp_path / "full")
    full, resumed = read_shards(tmp_path / "full"), load_targets(root)
    for name, value in full.items():
        assert torch.equal(resumed[name], value), name


if __name__ == "__main__":  # the job the SIGKILL test kills
    slow_model, slow_images = problem()
    generate(slowed(slow_model, 0.2), slow_images, Path(sys.argv[1]))
