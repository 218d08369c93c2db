"""Dataset jobs on real, imperfect data: unreadable images, resumes with another configuration,
damaged shards, leftovers of killed writes; models that are dropped; the hook fallback under
threads; and the command line's one-line errors."""

from __future__ import annotations

import gc
import json
import os
import pickle
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_cases import images, small_net
from test_reliability_state import TraceBreaker
from torch import nn

import fastxai
from fastxai.cli import main as cli
from fastxai.io import DamagedShardError, ShardWriter, read_shards
from fastxai.stream import ImageFiles, ItemError, explain_dataset

SIZE = 32


def preprocess(picture) -> torch.Tensor:
    array = np.asarray(picture.resize((SIZE, SIZE)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] - 0.5


def write_folder(root: Path, count: int = 12, corrupt: tuple[int, ...] = ()) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        path = root / ("ab"[i % 2]) / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(path)
    for i in corrupt:
        path = root / ("ab"[i % 2]) / f"img{i:03d}.png"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # truncated, as a copy cut short
    return root


def run_job(model: nn.Module, data, out: Path, **options) -> int:
    options = {"batch_size": 4, "shard_size": 4, "progress": False, **options}
    return explain_dataset(model, data, "features", out, **options)


@pytest.fixture()
def folder(tmp_path: Path) -> ImageFiles:
    return ImageFiles(write_folder(tmp_path / "images", corrupt=(5,)), preprocess)


def test_an_unreadable_image_is_recorded_and_the_job_goes_on(tmp_path, folder):
    model, out = small_net(1).eval(), tmp_path / "out"
    with pytest.warns(UserWarning, match=r"1 item\(s\) could not be read .*img005\.png"):
        written = run_job(model, folder, out)
    assert written == 11
    failed = json.loads((out / "failed-rank0.json").read_text())["failed"]
    bad = [p.name for p in folder.files].index("img005.png")
    assert [(f["index"], Path(f["item"]).name) for f in failed] == [(bad, "img005.png")]
    assert "truncated" in failed[0]["reason"]
    done = read_shards(out)["index"].tolist()
    assert bad not in done and len(done) == 11
    # strict: the first unreadable file stops the job, named
    with pytest.raises(ItemError, match=r"img005\.png: OSError"):
        run_job(model, folder, tmp_path / "strict", strict=True)
    # a resume tries the unreadable item again (still unreadable: recorded again)
    with pytest.warns(UserWarning, match=r"1 item\(s\) could not be read"):
        assert run_job(model, folder, out) == 0
    # a repaired file changes the dataset (its size): a restart redoes the folder, no record
    write_folder(tmp_path / "images")
    repaired = ImageFiles(tmp_path / "images", preprocess)
    with pytest.raises(ValueError, match="its dataset was"):
        run_job(model, repaired, out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: nothing failed
        assert run_job(model, repaired, out, restart=True) == 12
    assert not (out / "failed-rank0.json").exists()
    assert read_shards(out)["index"].tolist() == list(range(12))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(autocast=torch.bfloat16), "autocast"),
        (dict(memory_format=torch.channels_last), "memory_format"),
        (dict(method="layercam"), "method"),
        (dict(tft=True), "tft"),
        (dict(maps_dtype=torch.float32), "maps_dtype"),
        ("weights", "model_weights"),
        ("dataset", "dataset"),
    ],
)
def test_a_resume_with_another_configuration_is_refused(tmp_path, change, named):
    model, out = small_net(1).eval(), tmp_path / "out"
    root = write_folder(tmp_path / "images", count=8)
    data = ImageFiles(root, preprocess)
    run_job(model, data, out)
    options: dict = {}
    if change == "weights":
        model = small_net(2).eval()
    elif change == "dataset":
        (root / "a" / "img000.png").unlink()
        data = ImageFiles(root, preprocess)
    else:
        options = change
    with pytest.raises(ValueError, match=rf"its {named} was .* start afresh with restart=True"):
        run_job(model, data, out, **options)
    assert run_job(model, data, out, restart=True, **options) == len(data)  # starts afresh


def test_aft_masks_of_another_model_are_refused(tmp_path):
    from fastxai.aft import FashionCNN, generate_masks

    torch.manual_seed(0)
    x = torch.randn(6, 1, 28, 28)
    options = dict(layer="layer3", batch_size=3, shard_size=3, progress=False)
    first = generate_masks(FashionCNN(width=4).eval(), x, tmp_path / "m", **options)
    assert first.computed == 6
    other = FashionCNN(width=4).eval()  # other random weights
    with pytest.raises(ValueError, match="its model_weights was"):
        generate_masks(other, x, tmp_path / "m", **options)
    with pytest.raises(ValueError, match="its images was"):
        generate_masks(FashionCNN(width=4).eval(), x + 1, tmp_path / "m", **options)
    assert generate_masks(other, x, tmp_path / "m", restart=True, **options).computed == 6


def test_shards_without_meta_are_refused(tmp_path):
    model, out, x = small_net(1).eval(), tmp_path / "out", images(6, SIZE)
    run_job(model, x, out)
    (out / "meta.json").unlink()
    with pytest.raises(ValueError, match=r"holds shards but no meta\.json"):
        run_job(model, x, out, method="layercam")
    (out / "meta.json").write_text('{"method": ')
    with pytest.raises(ValueError, match=r"meta\.json: not readable JSON"):
        run_job(model, x, out)


def _damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    elif kind == "wrong keys":
        torch.save({"index": torch.arange(4), "other": torch.zeros(4)}, path)
    elif kind == "not a dict":
        torch.save([torch.zeros(4)], path)


@pytest.mark.parametrize("kind", ["truncated", "empty", "random bytes", "wrong keys", "not a dict"])
def test_a_damaged_shard_is_named_and_its_items_redone(tmp_path, kind):
    model, x = small_net(1).eval(), images(10, SIZE)
    clean, out = tmp_path / "clean", tmp_path / "out"
    run_job(model, x, clean)
    run_job(model, x, out)
    _damage(out / "rank0-000001.pt", kind)
    with pytest.raises(DamagedShardError, match=r"rank0-000001\.pt: .*rerun the job"):
        read_shards(out)
    with pytest.warns(UserWarning, match=r"rank0-000001\.pt.*moved to rank0-000001\.pt\.damaged"):
        assert run_job(model, x, out) == 4  # the damaged shard's items, again
    got, want = read_shards(out), read_shards(clean)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_leftover_temporary_files_of_a_killed_write_are_removed(tmp_path):
    model, out, x = small_net(1).eval(), tmp_path / "out", images(6, SIZE)
    run_job(model, x, out)
    stale = out / ".rank0-000007.pt.k3j2.tmp"
    stale.write_bytes(b"half a shard")
    other_rank = out / ".rank1-000000.pt.x.tmp"  # another rank's: may be being written
    other_rank.write_bytes(b"")
    ShardWriter(out, shard_size=4)
    assert not stale.exists() and other_rank.exists()


def _freed_without_gc(make, call) -> bool:
    gc.collect()
    gc.disable()
    try:
        model = make()
        call(model)
        ref = weakref.ref(model)
        del model
        return ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "call",
    [
        lambda m: fastxai.gradcam(m, images(1, SIZE), "features"),
        lambda m: fastxai.layercam(m, images(1, SIZE), ["block", "features"], tft=True),
        lambda m: fastxai.activation_matching(
            m, images(1, SIZE), layers=["features"], areas=(0.3,), progress=False
        ),
    ],
    ids=["gradcam", "layercam tft", "activation_matching"],
)
def test_a_dropped_model_is_freed_without_the_cycle_collector(call):
    assert _freed_without_gc(lambda: small_net(3).eval(), call)


def test_memory_stays_flat_over_40_model_loads():
    import torchvision
    from test_reliability_runtime import rss_bytes

    x = torch.randn(1, 3, 64, 64)

    def load_and_explain() -> None:
        model = torchvision.models.resnet18().eval()  # 45 MB of weights
        fastxai.gradcam(model, x, "layer4")

    for _ in range(5):
        load_and_explain()
    before = rss_bytes()
    for _ in range(40):
        load_and_explain()
    grown = (rss_bytes() - before) / 2**20
    # a model kept per load would add ~45 MiB each (1.8 GiB); allocator noise stays far below
    assert grown < 200, f"RSS grew by {grown:.0f} MiB over 40 loads"


def test_the_hook_fallback_is_safe_across_threads():
    model, x = TraceBreaker().eval(), images(2, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = fastxai.gradcam(model, x, "net.features").maps
        errors: list[BaseException] = []
        results: list[torch.Tensor] = []

        def worker() -> None:
            try:
                for _ in range(20):
                    results.append(fastxai.gradcam(model, x, "net.features").maps)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert len(results) == 80 and all(torch.equal(r, expected) for r in results)
    assert not model.net.features._forward_hooks


def test_score_cam_runs_on_a_half_precision_model():
    model = small_net(5).eval().half()
    x = images(2, SIZE).half()
    maps = fastxai.scorecam(model, x, "features").maps
    reference = fastxai.scorecam(small_net(5).eval(), x.float(), "features").maps
    torch.testing.assert_close(maps.float(), reference, atol=2e-2, rtol=0)  # fp16 scores


def test_a_one_pixel_map_warns_naming_the_layer():
    model = small_net(1).eval()
    with pytest.warns(UserWarning, match=r"layer 'features' gives a 1 x 1 map for 2 x 2 inputs"):
        fastxai.gradcam(model, images(1, 2), "features")


def test_nn_is_an_attribute_and_numpy_integers_are_targets():
    assert fastxai.nn.Explainer is not None and fastxai.io.read_shards is read_shards
    model, x = small_net(1).eval(), images(2, SIZE)
    want = fastxai.gradcam(model, x, "features", [1, 3]).maps
    got = fastxai.gradcam(model, x, "features", np.array([1, 3])).maps
    assert torch.equal(got, want)
    assert torch.equal(fastxai.gradcam(model, x, "features", [np.int64(1), 3]).maps, want)


# --- the command line: one line naming the argument or file -------------------------------------


def _cli_error(capsys, argv: list[str]) -> str:
    code = cli(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_dataset_job_errors_are_one_line(tmp_path, capsys):
    root = write_folder(tmp_path / "images", count=4, corrupt=(1,))
    common = ["--model", "resnet18", "--no-progress", "--batch-size", "2"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    err = _cli_error(capsys, ["explain-dataset", str(root), "--out", str(a_file), *common])
    assert "is a file, expected a folder" in err
    out = tmp_path / "out"
    assert cli(["explain-dataset", str(root), "--out", str(out), *common]) == 1  # 1 unreadable
    assert "1 could not be read" in capsys.readouterr().out
    err = _cli_error(
        capsys, ["explain-dataset", str(root), "--out", str(out), "--autocast", "bfloat16", *common]
    )
    assert "its autocast was 'None'" in err and "--restart" in err
    err = _cli_error(capsys, ["explain-dataset", str(root), "--out", str(out), "--strict", *common])
    assert "img001.png: OSError" in err


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo exploited",))


def test_cli_aft_errors_are_one_line(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Exploit()))
    err = _cli_error(
        capsys, ["aft", "prepare", "--weights", str(evil), "--out", str(tmp_path / "m")]
    )
    assert "--weights" in err and "not a loadable state dict" in err
    for device, message in (("banana", "expected cpu, cuda or cuda:N"), ("cuda:7", "--device")):
        if device.startswith("cuda") and torch.cuda.device_count() > 7:
            continue
        err = _cli_error(
            capsys, ["aft", "pretrain", "--out", str(tmp_path / "m.pt"), "--device", device]
        )
        assert message in err
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "meta.json").write_text(json.dumps({"num_items": 4, "method": "gradcam"}))
    (masks / "rank0-000000.pt").write_bytes(pickle.dumps(_Exploit()))
    model = tmp_path / "model.pt"
    from fastxai.aft.models import FashionCNN

    torch.save(FashionCNN().state_dict(), model)
    err = _cli_error(
        capsys,
        [
            "aft",
            "train",
            "--weights",
            str(model),
            "--masks",
            str(masks),
            "--out",
            str(tmp_path / "t.pt"),
        ],
    )
    assert "rank0-000000.pt" in err
