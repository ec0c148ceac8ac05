"""Writer guarantees: resume after SIGKILL gives identical files, locking, overwrite, refusals, empty builds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lm_eval_c3po.store import (
    EmptyStoreError,
    ReferenceStore,
    StoreExistsError,
    StoreLockedError,
    StoreWriter,
)
from lm_eval_c3po.store.synthetic import synthetic_manifest, synthetic_record, synthetic_records

L, E, D = 4, 8, 16
N, SHARD = 60, 8
REPO = Path(__file__).resolve().parents[1]


def manifest(**build):
    return synthetic_manifest(L, E, 2, D, **build)


def build(path, n=N, shard_size=SHARD, **kwargs):
    """What a builder does: skip the docs already in finished shards, add the rest in order."""
    with StoreWriter(path, manifest(), shard_size=shard_size, **kwargs) as writer:
        done = writer.done_ids()
        for r in synthetic_records(n, L, E, D):
            if r.id not in done:
                writer.add(r)


def files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted((path / "shards").iterdir())}


SLOW_BUILDER = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from lm_eval_c3po.store import StoreWriter
from lm_eval_c3po.store.synthetic import synthetic_manifest, synthetic_records
with StoreWriter(sys.argv[1], synthetic_manifest({L}, {E}, 2, {D}), shard_size={SHARD}) as w:
    for r in synthetic_records({N}, {L}, {E}, {D}):
        w.add(r)
        time.sleep(0.01)
"""


def test_sigkill_mid_build_then_resume_gives_identical_store(tmp_path):
    reference = tmp_path / "uninterrupted"
    build(reference)

    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", SLOW_BUILDER, str(out)])
    progress = out / "progress.json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if progress.exists() and len(json.loads(progress.read_text())["shards"]) >= 2:
            break
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()

    # The dead writer's lock is taken over; finished shards are kept, not redone.
    with StoreWriter(out, manifest(), shard_size=SHARD) as writer:
        done = writer.done_ids()
        assert len(done) >= 2 * SHARD and len(done) % SHARD == 0 and len(done) < N
        for r in synthetic_records(N, L, E, D):
            if r.id not in done:
                writer.add(r)

    assert files(out) == files(reference)  # byte-identical shard tensors and texts
    a, b = ReferenceStore.load(out), ReferenceStore.load(reference)
    assert a.manifest.sources == b.manifest.sources and a.manifest.shards == b.manifest.shards
    np.testing.assert_array_equal(a.routing, b.routing)
    assert not (out / "progress.json").exists() and not (out / ".lock").exists()


def test_second_writer_is_refused_by_the_lock(tmp_path):
    first = StoreWriter(tmp_path / "s", manifest(), shard_size=SHARD)
    with pytest.raises(StoreLockedError, match=f"another process \\(pid {os.getpid()}\\)"):
        StoreWriter(tmp_path / "s", manifest(), shard_size=SHARD)
    for r in synthetic_records(10, L, E, D):
        first.add(r)
    first.close()
    build(tmp_path / "s", n=10)  # free again once closed; same settings: already complete, nothing redone


def test_rerun_of_a_complete_build_changes_nothing(tmp_path):
    build(tmp_path / "s")
    before = (tmp_path / "s" / "manifest.json").read_bytes()
    with StoreWriter(tmp_path / "s", manifest(), shard_size=SHARD) as writer:
        assert writer.done_ids() == {r.id for r in synthetic_records(N, L, E, D)}
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before


def test_different_settings_are_refused_then_overwritten_atomically(tmp_path):
    out = tmp_path / "s"
    build(out)
    refused = r"complete store with different settings \(build.keep: 'acc' -> 'all'\).*--overwrite"
    with pytest.raises(StoreExistsError, match=refused):
        StoreWriter(out, manifest(), shard_size=SHARD, keep="all")

    # An overwrite that dies before close() leaves the old store whole.
    with pytest.raises(RuntimeError):
        with StoreWriter(out, manifest(), shard_size=SHARD, keep="all", overwrite=True) as writer:
            for r in synthetic_records(20, L, E, D):
                writer.add(r)
            raise RuntimeError("builder crashed")
    assert ReferenceStore.load(out).manifest.build["keep"] == "acc"

    build(out, keep="all", overwrite=True)  # resumes the hidden partial build, then swaps it in
    store = ReferenceStore.load(out)
    assert store.manifest.build["keep"] == "all" and len(store) == N
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no partial or old tree left behind


def test_foreign_directory_is_never_written(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(StoreExistsError, match="holds no reference store"):
            StoreWriter(tmp_path, manifest(), overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_empty_build_is_refused_and_touches_nothing(tmp_path):
    wrong = [synthetic_record(i, L, E, D) for i in range(12)]
    for r in wrong:
        r.correct = False
    refused = r"nothing was kept.*0 of 12 docs.*right on \(synth_a: 0/6 right, synth_b: 0/6 right\)"
    with pytest.raises(EmptyStoreError, match=refused):
        with StoreWriter(tmp_path / "new", manifest(), shard_size=5) as writer:
            for r in wrong:
                writer.add(r)
    assert not (tmp_path / "new").exists()

    build(tmp_path / "old")
    before = files(tmp_path / "old")
    with pytest.raises(EmptyStoreError, match="no docs were given.*nothing already in .*old was changed"):
        StoreWriter(tmp_path / "old", manifest(), overwrite=True).close()
    assert files(tmp_path / "old") == before and len(ReferenceStore.load(tmp_path / "old")) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_bad_records_are_refused_at_add(tmp_path):
    with StoreWriter(tmp_path / "s", manifest(), keep="all") as writer:
        r = synthetic_record(0, L, E, D)
        logits = synthetic_record(1, L, E, D)
        logits.routing = logits.routing * 5
        with pytest.raises(ValueError, match="not logits"):
            writer.add(logits)
        short = synthetic_record(2, L, E, D + 1)
        with pytest.raises(ValueError, match="17 dims, the embedder signature says 16"):
            writer.add(short)
        writer.add(r)
        with pytest.raises(ValueError, match="already added"):
            writer.add(r)


def test_disk_full_while_writing_a_shard_keeps_earlier_shards_and_resumes(tmp_path, monkeypatch):
    import errno

    from lm_eval_c3po.store import shards

    reference = tmp_path / "uninterrupted"
    build(reference)
    out = tmp_path / "full"
    real_write, calls = shards.atomic_write, []

    def fills_up(path, data):
        calls.append(path)
        if len(calls) > 5:  # the disk fills up inside the third shard
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(shards, "atomic_write", fills_up)
    with pytest.raises(OSError, match="No space left"):
        build(out)
    monkeypatch.setattr(shards, "atomic_write", real_write)
    assert not (out / "manifest.json").exists()
    with StoreWriter(out, manifest(), shard_size=SHARD) as writer:
        done = writer.done_ids()
        assert len(done) == 2 * SHARD  # the shards finished before the disk filled stay valid
        for r in synthetic_records(N, L, E, D):
            if r.id not in done:
                writer.add(r)
    assert files(out) == files(reference)
