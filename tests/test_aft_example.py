"""The AFT command line and a reduced run of examples/aft_fashion_mnist.py."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from fastxai.aft.data import FASHION_MNIST_ENV, INSTALL_COMMAND, fashion_mnist_missing
from fastxai.cli import main as fastxai_main


def main(argv: list[str]) -> int:
    return fastxai_main(["aft", *argv])


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "aft_fashion_mnist.py"
needs_data = pytest.mark.skipif(
    fashion_mnist_missing() is not None, reason=f"needs Fashion-MNIST: `{INSTALL_COMMAND}`"
)


def test_cli_reports_a_missing_dataset(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    assert main(["pretrain", "--out", str(tmp_path / "m.pt"), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "fastxai aft pretrain: error:" in error and INSTALL_COMMAND in error
    assert not (tmp_path / "m.pt").exists()


def test_cli_argument_errors(tmp_path, capsys) -> None:
    missing = tmp_path / "none.pt"
    assert main(["prepare", "--weights", str(missing), "--out", str(tmp_path / "m")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--weights",
                str(missing),
                "--masks",
                str(tmp_path),
                "--out",
                str(tmp_path / "a.pt"),
            ]
        )
        == 1
    )
    assert "fastxai aft prepare" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


@needs_data
def test_cli_pretrain_prepare_train_evaluate(tmp_path, capsys) -> None:
    model, masks, tuned = tmp_path / "model.pt", tmp_path / "masks", tmp_path / "aft.pt"
    small = ["--width", "4", "--quiet"]
    assert (
        main(["pretrain", "--out", str(model), "--train-size", "256", "--epochs", "1", *small]) == 0
    )
    assert (
        main(
            [
                "prepare",
                "--weights",
                str(model),
                "--out",
                str(masks),
                "--train-size",
                "96",
                "--batch-size",
                "32",
                "--shard-size",
                "40",
                *small,
            ]
        )
        == 0
    )
    assert sorted(p.name for p in masks.glob("rank0-*.pt")) == [
        "rank0-000000.pt",
        "rank0-000001.pt",
        "rank0-000002.pt",
    ]
    assert (
        main(
            [
                "train",
                "--weights",
                str(model),
                "--masks",
                str(masks),
                "--out",
                str(tuned),
                "--batch-size",
                "32",
                "--lr",
                "0.01",
                "--tuner-init",
                "mean",
                *small,
            ]
        )
        == 0
    )
    original, after = torch.load(model), torch.load(tuned)
    assert set(after) == set(original)
    assert torch.equal(after["layer1.0.weight"], original["layer1.0.weight"])  # frozen
    assert not torch.equal(after["fc.weight"], original["fc.weight"])
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--weights",
                str(model),
                "--aft",
                f"gradcam={tuned}",
                "--test-size",
                "64",
                "--metric-size",
                "32",
                *small,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| gradcam |" in printed and "| AFT (gradcam) |" in printed
    assert main(["evaluate", "--weights", str(model), "--aft", f"nomethod={tuned}", *small]) == 2
    assert (
        main(["evaluate", "--weights", str(tuned), "--aft", f"gradcam={tuned}", "--width", "8"])
        == 2
    )  # the state dict does not fit a wider CNN


@needs_data
def test_reduced_example(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("aft_fashion_mnist", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.parse_args(
        [
            "--out",
            str(tmp_path),
            "--methods",
            "gradcam",
            "layercam",
            "--pretrain-size",
            "384",
            "--train-size",
            "384",
            "--test-size",
            "256",
            "--metric-size",
            "64",
            "--width",
            "4",
            "--pretrain-epochs",
            "2",
            "--pretrain-batch-size",
            "16",
            "--pretrain-lr",
            "0.005",
            "--aft-epochs",
            "1",
            "--quiet",
        ]
    )
    tables = example.run(args)
    printed = capsys.readouterr().out
    assert "| gradcam |" in printed and "| layercam |" in printed
    assert json.loads((tmp_path / "tables.json").read_text())["accuracy"] == tables["accuracy"]
    for row in tables["table3"]:
        for column in ("original", "tft", "aft"):
            assert 0 <= row["increase"][column] <= 1 and 0 <= row["drop"][column] <= 1
            assert not math.isnan(row["increase"][column])
    # Two epochs on 384 images: well above chance (10%), and AFT (one epoch, small lr) keeps it.
    accuracy = tables["accuracy"]
    assert accuracy["original"] > 0.3
    assert abs(accuracy["gradcam"] - accuracy["original"]) < 0.1
    # A rerun reuses every stage (model, masks, AFT checkpoint) and prints the same tables.
    again = example.run(args)
    assert again["table3"] == tables["table3"] and again["accuracy"] == tables["accuracy"]
