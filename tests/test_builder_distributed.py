"""`c3po build-reference` on several processes (issue #9): disjoint slices, merged into the one-process store.

The launched build must write the very store one process writes: same
records, order, pathways, embeddings, shard files and manifest (``created``
aside). Float32 sums depend on the thread split, so the one-process reference
runs on one thread, as every launched process does (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from resume_checks import KILLED, killed_at, steps_of, store_files

from lm_eval_c3po.cli import main as c3po
from lm_eval_c3po.store import StoreWriter
from lm_eval_c3po.store.crash_points import CRASH_ENV
from lm_eval_c3po.store.synthetic import synthetic_manifest, synthetic_records
from reference_builders.distributed import (
    Launch,
    check_parts,
    merge_parts,
    merge_plan,
    part_dir,
    parts_dir,
    rank_docs,
)
from reference_builders.errors import BuildError

# `accelerate launch` as users type it; `--multi_gpu` is its local multi-process launcher, CPU-only machines included.
LAUNCH_TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", "0"]


@pytest.mark.parametrize("n, world", [(8, 2), (7, 3), (2, 4), (1, 1)])
def test_ranks_share_the_docs_and_the_merge_restores_their_order(n, world):
    docs = [f"task/{i}" for i in range(n)]
    slices = [rank_docs(docs, Launch(rank, world)) for rank in range(world)]
    assert sorted(sum(slices, [])) == sorted(docs)  # disjoint, and nothing left out
    assert all(len(s) - len(slices[-1]) in (0, 1) for s in slices)  # balanced to one doc

    done = frozenset(docs[: n // 3])  # a merge interrupted after its first docs
    plan = merge_plan(docs, done, world)
    assert [doc_id for doc_id, _ in plan] == [d for d in docs if d not in done]  # stream order, undone docs
    for rank in range(world):
        assert [doc_id for doc_id, r in plan if r == rank] == [d for d in slices[rank] if d not in done]


def test_parts_of_another_world_size_are_refused(tmp_path):
    out = tmp_path / "store"
    check_parts(out, 2)  # no parts: any world size goes
    part_dir(out, 1, 2).mkdir(parents=True)
    check_parts(out, 2)  # same world size: resumed
    for world in (1, 3):
        with pytest.raises(BuildError, match=rf"unfinished build on 2 processes .* this run has {world}: "
                                             rf"rerun with 2 processes to resume it, or delete .* to start over"):
            check_parts(out, world)


L, E, D, N, SHARD, WORLD = 4, 8, 16, 12, 4, 3
BASE = synthetic_manifest(L, E, 2, D)
RECORDS = list(synthetic_records(N, L, E, D))


def _write(out: Path, records, keep: str) -> None:
    with StoreWriter(out, BASE, shard_size=SHARD, keep=keep) as writer:
        for record in records:
            writer.add(record)


def _merge(out: Path) -> None:
    """Rank 0's last step: the parts, merged into the final store (resuming a merge already under way)."""
    with StoreWriter(out, BASE, shard_size=SHARD, keep="acc") as writer:
        merge_parts(out, [r.id for r in RECORDS], writer.done_ids(), WORLD, writer)


def test_merged_parts_are_the_one_writer_store_even_when_the_merge_is_killed(tmp_path):
    """Parts keep every doc; the merge applies the keep policy in stream order, so the shard
    boundaries, counts and bytes are those of one writer, and a killed merge resumes."""
    single = tmp_path / "single"
    _write(single, RECORDS, "acc")

    merged = tmp_path / "merged"
    for rank in range(WORLD):
        _write(part_dir(merged, rank, WORLD), rank_docs(RECORDS, Launch(rank, WORLD)), "all")
    parts = tmp_path / "parts"
    shutil.copytree(parts_dir(merged), parts)
    steps = steps_of(_merge, merged)
    assert store_files(merged) == store_files(single)
    for step in range(1, steps + 1):
        out = tmp_path / f"killed-at-{step}"
        shutil.copytree(parts, parts_dir(out))
        assert killed_at(step, _merge, out) == KILLED, step
        _merge(out)
        assert store_files(out) == store_files(single), f"merge killed at step {step}"


def _argv(model: Path, tasks: Path, out: Path) -> list[str]:
    return ["build-reference", "--model", str(model), "--model_args", "dtype=float32", "--device", "cpu",
            "--tasks", "tiny_mc", "--include_path", str(tasks), "--shard_size", "2", "--out", str(out)]


def _launch_two(argv: list[str], *, crash_rank_1_at: int = 0) -> subprocess.CompletedProcess:
    """`accelerate launch` two processes of the builder; rank 1 SIGKILLs itself at a crash point if asked."""
    command = " ".join(["exec", sys.executable, "-m", "lm_eval_c3po.cli", *argv])
    crash = f'[ "$RANK" = 1 ] && export {CRASH_ENV}={crash_rank_1_at}; ' if crash_rank_1_at else ""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*LAUNCH_TWO, "--no_python", "bash", "-c", crash + command],
                          capture_output=True, text=True, env=env, timeout=300)


def test_two_processes_resume_after_a_rank_is_killed_and_merge_into_the_one_process_store(
    tiny_model_dir, tiny_task_dir, tmp_path, capsys
):
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert c3po(_argv(tiny_model_dir, tiny_task_dir, one)) == 0
    finally:
        torch.set_num_threads(threads)

    # Rank 1 dies renaming the text file of its second shard; the launcher then stops rank 0 wherever it is.
    killed = _launch_two(_argv(tiny_model_dir, tiny_task_dir, two), crash_rank_1_at=12)
    assert killed.returncode != 0 and f"{CRASH_ENV}=12: killed before renaming" in killed.stderr, killed.stderr[-3000:]
    assert not (two / "manifest.json").exists() and part_dir(two, 1, 2).is_dir()

    capsys.readouterr()
    assert c3po(_argv(tiny_model_dir, tiny_task_dir, two)) == 1  # one process cannot resume two's parts
    assert "unfinished build on 2 processes" in capsys.readouterr().err

    resumed = _launch_two(_argv(tiny_model_dir, tiny_task_dir, two))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[rank 1/2] resuming: 2 of 4 docs are in finished shards" in resumed.stdout
    assert "(harvested by 2 processes)" in resumed.stdout
    assert store_files(two) == store_files(one)  # the same shard bytes, the same manifest but its time
    assert not parts_dir(two).exists()
