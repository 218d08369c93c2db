"""fastxai.io: shards are complete or absent, a resumed job skips exactly what was written."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastxai.io import ShardWriter, atomic_save, completed_indices, read_meta, read_shards


def write_all(root: Path, indices: torch.Tensor, shard_size: int, rank: int = 0) -> None:
    with ShardWriter(root, shard_size=shard_size, rank=rank, meta={"job": "squares"}) as writer:
        for batch in writer.pending(indices).split(3):
            writer.write(batch, value=batch.double() ** 2, pair=torch.stack([batch, -batch], 1))


def test_round_trip_sorted_by_index(tmp_path: Path) -> None:
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    write_all(tmp_path, order, shard_size=4)
    result = read_shards(tmp_path)
    torch.testing.assert_close(result["index"], torch.arange(20))
    torch.testing.assert_close(result["value"], torch.arange(20).double() ** 2)
    torch.testing.assert_close(result["pair"][:, 1], -torch.arange(20))
    assert len(list(tmp_path.glob("rank0-*.pt"))) == 5
    assert read_meta(tmp_path) == {"job": "squares"}


def test_pending_skips_only_complete_shards(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, shard_size=4)
    writer.write(torch.arange(6), value=torch.zeros(6))
    # 4 items form a complete shard; 2 wait in the buffer and are lost without close().
    torch.testing.assert_close(completed_indices(tmp_path), torch.arange(4))
    torch.testing.assert_close(writer.pending(range(8)), torch.arange(4, 8))


def test_killed_job_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """A process killed mid-job leaves only complete shards; the rerun finishes the rest."""
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from fastxai.io import ShardWriter
        with ShardWriter({str(killed)!r}, shard_size=5) as writer:
            for batch in writer.pending(range(40)).split(3):
                writer.write(batch, value=batch.double().sqrt())
                if int(batch[-1]) >= 22:
                    os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert run.returncode != 0, "the job was meant to die mid-way"
    partial = completed_indices(killed)
    assert 0 < partial.numel() < 40
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]
    with ShardWriter(killed, shard_size=5) as writer:
        todo = writer.pending(range(40))
        assert not torch.isin(todo, partial).any()
        for batch in todo.split(3):
            writer.write(batch, value=batch.double().sqrt())
    with ShardWriter(clean, shard_size=5) as writer:
        writer.write(torch.arange(40), value=torch.arange(40).double().sqrt())
    resumed, reference = read_shards(killed), read_shards(clean)
    assert torch.equal(resumed["index"], reference["index"])
    assert torch.equal(resumed["value"], reference["value"])


def test_ranks_write_separate_files_and_merge(tmp_path: Path) -> None:
    write_all(tmp_path, torch.arange(0, 10, 2), shard_size=2, rank=0)
    write_all(tmp_path, torch.arange(1, 10, 2), shard_size=2, rank=1)
    assert {p.name[:5] for p in tmp_path.glob("rank*.pt")} == {"rank0", "rank1"}
    torch.testing.assert_close(read_shards(tmp_path)["index"], torch.arange(10))


def test_other_jobs_meta_is_refused(tmp_path: Path) -> None:
    ShardWriter(tmp_path, meta={"method": "gradcam"})
    with pytest.raises(ValueError, match="another job"):
        ShardWriter(tmp_path, meta={"method": "scorecam"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"shard_size": 0}, "shard_size"), ({"rank": -1}, "rank")],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShardWriter(tmp_path, **kwargs)


def test_write_checks_rows_and_fields(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path)
    with pytest.raises(ValueError, match="'value' must be a tensor with 3 rows"):
        writer.write(torch.arange(3), value=torch.zeros(2))
    with pytest.raises(ValueError, match="reserved"):
        writer.write(torch.arange(3), index=torch.zeros(3))
    writer.write(torch.arange(3), value=torch.zeros(3))
    with pytest.raises(ValueError, match="differ"):
        writer.write(torch.arange(3, 6), other=torch.zeros(3))
    with pytest.raises(FileNotFoundError, match="no complete shards"):
        read_shards(tmp_path / "missing")


def test_atomic_save_leaves_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_save({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self) -> tuple:
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"epoch": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
