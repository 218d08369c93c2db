"""Mask generation and AFT under ``torchrun --nproc_per_node=2`` (gloo, CPU) equal one process.

This file is also the script torchrun runs (see ``__main__``). Tolerance: the masks agree
exactly; the tuned weights agree within ``atol=1e-6`` (the same per-step global batches, so only
the float summation order of the gradient all-reduce differs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from fastxai import distributed
from fastxai.aft import AFTConfig, AFTTrainer, FashionCNN, generate_masks, load_targets
from fastxai.io import atomic_save

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG = AFTConfig(epochs=2, batch_size=16, lr=0.05, progress=False)


def problem(n: int = 48) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = FashionCNN(width=4).eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def job(root: Path, context: distributed.Context | None = None) -> dict[str, object]:
    """Masks, then AFT on them: what a torchrun launch and a single process both run."""
    model, images, labels = problem()
    generate_masks(
        model,
        images,
        root / "masks",
        layer="layer3",
        batch_size=4,
        shard_size=6,
        context=context,
        progress=False,
    )
    fields = load_targets(root / "masks")
    trainer = AFTTrainer(model, "layer3", CONFIG, context=context)
    result = trainer.fit(images, labels, fields["target"], checkpoint=root / "aft.ckpt")
    return {"fields": fields, "state_dict": result.state_dict, "tuner": result.tuner}


def test_two_gloo_processes_match_one_process(tmp_path) -> None:
    single = job(tmp_path / "single")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        __file__,
        str(tmp_path / "ddp"),
    ]
    done = subprocess.run(
        command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = {p.name.split("-")[0] for p in (tmp_path / "ddp" / "masks").glob("rank*-*.pt")}
    assert ranks == {"rank0", "rank1"}  # both ranks wrote their share of the masks
    ddp = torch.load(tmp_path / "ddp" / "result.pt", weights_only=True)
    for name, value in single["fields"].items():
        assert torch.equal(ddp["fields"][name], value), name
    for part in ("state_dict", "tuner"):
        for name, value in single[part].items():
            torch.testing.assert_close(ddp[part][name], value, rtol=0, atol=1e-6)
    base = problem()[0].state_dict()
    assert not torch.allclose(single["state_dict"]["fc.weight"], base["fc.weight"], atol=1e-3)


if __name__ == "__main__":  # one rank of the torchrun launch
    context = distributed.init_from_env("cpu")
    assert context.world_size == 2, context
    out = Path(sys.argv[1])
    result = job(out, context)
    if context.is_main:
        atomic_save(result, out / "result.pt")
    distributed.shutdown()
