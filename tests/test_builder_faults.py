"""A build killed at any step resumes to the same store (issue #9).

Kills are real SIGKILLs, placed by the store's test-only crash points
(``C3PO_TEST_CRASH_AT=N``: die at the N-th step of the commit sequence:
before a temp file is written, before it is renamed, between manifest and
progress file, around the overwrite swap). The writer is killed at every one
of its steps; the real ``c3po build-reference`` at seeded random steps, over
and over, each rerun resuming what the last one left.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import sys
from pathlib import Path

import pytest
from resume_checks import KILLED, killed_at, steps_of, store_files

from lm_eval_c3po.cli import main as c3po
from lm_eval_c3po.store import StoreWriter
from lm_eval_c3po.store.crash_points import CRASH_ENV, points_passed
from lm_eval_c3po.store.synthetic import synthetic_manifest, synthetic_records

L, E, D, N, SHARD = 4, 8, 16, 12, 4


def synthetic_build(out: Path, keep: str = "all", overwrite: bool = False) -> None:
    """What a builder does: skip the docs already in finished shards, add the rest in order."""
    with StoreWriter(out, synthetic_manifest(L, E, 2, D), shard_size=SHARD, keep=keep, overwrite=overwrite) as w:
        done = w.done_ids()
        for record in synthetic_records(N, L, E, D):
            if record.id not in done:
                w.add(record)


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_writer_killed_at_every_step_resumes_to_the_same_store(overwrite, tmp_path):
    reference = tmp_path / "reference"
    if overwrite:
        synthetic_build(reference, keep="acc")  # an older store of other settings, replaced at close
    steps = steps_of(synthetic_build, reference, "all", overwrite)
    assert steps == 2 + 6 * (N // SHARD) + 3 + (2 if overwrite else 0)  # progress, 3 shards, close (+ swap)

    for step in range(1, steps + 1):
        out = tmp_path / f"killed-at-{step}"
        if overwrite:
            synthetic_build(out, keep="acc")
        assert killed_at(step, synthetic_build, out, "all", overwrite) == KILLED, step
        synthetic_build(out, overwrite=overwrite)
        assert store_files(out) == store_files(reference), f"killed at step {step}"
        assert not out.with_name(f".{out.name}.c3po-partial").exists()


def test_an_error_before_the_first_shard_leaves_no_unfinished_build(tmp_path):
    """The progress file is written first (so a kill anywhere leaves a resumable build), but an
    exception (Ctrl-C, a crashing model) before any shard is finished removes it again."""
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(tmp_path / "s", synthetic_manifest(L, E, 2, D), shard_size=SHARD) as writer:
            writer.add(next(synthetic_records(1, L, E, D)))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def _build_reference(argv: list[str], crash_at: int, steps_file: str | None = None) -> None:
    """One `c3po build-reference` run in a fresh process; ``steps_file`` receives the crash points it passed."""
    os.environ[CRASH_ENV] = str(crash_at)
    code = c3po(argv)
    if steps_file:
        Path(steps_file).write_text(str(points_passed()))
    sys.exit(code)


@pytest.fixture(scope="module")
def builder_processes():
    """Fresh processes for the builder, forked from a server that imported the heavy modules once.

    Forking this test process instead could hang: a child's first torch op can
    deadlock on OpenMP threads that only existed in the parent.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([
        __name__, "lm_eval", "lm_eval.tasks", "lm_eval.models.huggingface", "lm_eval_c3po.lm_eval_model",
        "lm_eval_c3po.retrieve.embedding", "sentence_transformers", "transformers.models.olmoe.modeling_olmoe",
        "reference_builders.cli", "reference_builders.harvest", "reference_builders.tasks",
    ])

    def run(argv: list[str], crash_at: int, steps_file: Path | None = None) -> int:
        process = context.Process(target=_build_reference, args=(argv, crash_at, steps_file and str(steps_file)))
        process.start()
        process.join(timeout=300)
        if process.exitcode is None:
            process.kill()
            pytest.fail("the builder hung")
        return process.exitcode

    return run


SEEDS, KILLS_PER_SEED = (0, 1, 2), 3


def test_build_reference_killed_at_seeded_random_steps_resumes_to_the_same_store(
    builder_processes, tiny_model_dir, tiny_task_dir, tmp_path
):
    def argv(out: Path) -> list[str]:  # 8 docs in 4 shards; a batch holds a whole shard
        return ["build-reference", "--model", str(tiny_model_dir), "--model_args", "dtype=float32", "--device", "cpu",
                "--batch_size", "8", "--tasks", "tiny_mc", "--include_path", str(tiny_task_dir),
                "--shard_size", "2", "--out", str(out)]

    reference, steps_file = tmp_path / "reference", tmp_path / "steps"
    assert builder_processes(argv(reference), 0, steps_file) == 0
    steps = int(steps_file.read_text())  # the crash points of an uninterrupted build

    for seed in SEEDS:
        rng, out, kills = random.Random(seed), tmp_path / f"seed-{seed}", 0
        for _ in range(KILLS_PER_SEED):
            code = builder_processes(argv(out), rng.randint(1, steps))
            assert code in (KILLED, 0), code  # a resumed run has fewer steps and may finish before its kill
            kills += code == KILLED
        assert kills > 0, f"seed {seed} never killed the builder"
        assert builder_processes(argv(out), 0) == 0
        assert store_files(out) == store_files(reference), f"seed {seed}"

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert builder_processes(argv(out), 0) == 0  # rerunning a finished build is a no-op
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_sampled_build_killed_midway_resumes_the_same_sample(builder_processes, tiny_model_dir, tiny_task_dir,
                                                               tmp_path):
    """A real sample (5 of tiny_mc's 8 docs, seed 3): a killed build, rerun, ends with the uninterrupted store."""
    def argv(out: Path) -> list[str]:
        return ["build-reference", "--model", str(tiny_model_dir), "--model_args", "dtype=float32", "--device", "cpu",
                "--batch_size", "8", "--tasks", "tiny_mc", "--include_path", str(tiny_task_dir), "--sample-size",
                "tiny_mc=5", "--sample-seed", "3", "--shard_size", "2", "--out", str(out)]

    reference, steps_file, out = tmp_path / "reference", tmp_path / "steps", tmp_path / "resumed"
    assert builder_processes(argv(reference), 0, steps_file) == 0
    steps = int(steps_file.read_text())
    assert builder_processes(argv(out), steps // 2) == KILLED
    assert builder_processes(argv(out), 0) == 0
    assert store_files(out) == store_files(reference)
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["build"]["sample"]["sources"]["tiny_mc"]["taken"] == 5
    assert manifest["sources"]["tiny_mc"]["seen"] == 5
