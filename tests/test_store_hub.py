"""Stores shared through the Hugging Face Hub: resolved from a pre-filled hub cache offline, verified
like local stores, and pushed (the upload recorded, never sent)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lm_eval_c3po.cli import main as c3po
from lm_eval_c3po.store import StoreIncompleteError, StoreNotFoundError, StoreWriter, resolve_store
from lm_eval_c3po.store.hub import parse_hub_spec, push_store, store_files
from lm_eval_c3po.store.synthetic import synthetic_manifest, synthetic_records

ROOT = Path(__file__).resolve().parent.parent
L, E, D = 3, 8, 16
MAIN_SHA = "a" * 40
V1_SHA = "b" * 40


def _store(path: Path, n: int) -> Path:
    with StoreWriter(path, synthetic_manifest(L, E, 2, D, limit=n), shard_size=8, keep="all") as writer:
        for record in synthetic_records(n, L, E, D, tasks=("arc_easy", "sciq")):
            writer.add(record)
    return path


@pytest.fixture()
def hub_cache(tmp_path) -> Path:
    """A hub cache as huggingface_hub lays it out: two commits of datasets/org/refs, main at the first."""
    cache = tmp_path / "hub"
    repo = cache / "datasets--org--refs"
    _store(repo / "snapshots" / MAIN_SHA, 20)
    _store(repo / "snapshots" / V1_SHA, 12)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN_SHA)
    (repo / "refs" / "v1").write_text(V1_SHA)
    return cache


RESOLVE = """
import json, sys
from lm_eval_c3po.store import ReferenceStore, StoreError, resolve_store
out = {}
for spec in sys.argv[1:]:
    try:
        path = resolve_store(spec)
        out[spec] = [str(path), len(ReferenceStore.load(path))]
    except StoreError as err:
        out[spec] = [type(err).__name__, str(err)]
print(json.dumps(out))
"""


def _resolve_offline(cache: Path, cwd: Path, *specs: str) -> dict:
    """resolve_store + ReferenceStore.load in a fresh process with HF_HUB_CACHE / HF_HUB_OFFLINE set as a user would."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", RESOLVE, *specs], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hub_stores_resolve_offline_and_are_verified(hub_cache, tmp_path):
    snapshots = hub_cache / "datasets--org--refs" / "snapshots"
    work = tmp_path / "work"
    work.mkdir()
    got = _resolve_offline(hub_cache, work, "org/refs", f"org/refs@{V1_SHA}", "org/refs@v1", "org/other")
    assert got["org/refs"] == [str(snapshots / MAIN_SHA), 20]
    assert got[f"org/refs@{V1_SHA}"] == [str(snapshots / V1_SHA), 12]
    assert got["org/refs@v1"] == [str(snapshots / V1_SHA), 12]
    kind, message = got["org/other"]
    assert kind == "StoreNotFoundError"
    assert "no reference store at" in message and "Hugging Face Hub dataset org/other" in message

    # A damaged file in the cached snapshot is refused exactly as in a local store.
    shard = next((snapshots / MAIN_SHA / "shards").glob("*.jsonl"))
    shard.write_text(shard.read_text().replace('"', "'", 1))
    kind, message = _resolve_offline(hub_cache, work, "org/refs")["org/refs"]
    assert kind == "StoreCorruptError" and shard.name in message

    # A local directory of the same name wins over the Hub reading.
    _store(work / "org" / "refs", 9)
    assert _resolve_offline(hub_cache, work, "org/refs")["org/refs"] == ["org/refs", 9]


def test_specs_that_are_neither_name_both_readings(tmp_path):
    with pytest.raises(StoreNotFoundError, match="not a Hugging Face Hub dataset repo id either"):
        resolve_store(tmp_path / "a" / "b" / "c")
    with pytest.raises(StoreNotFoundError, match=r"no reference store at .*could not be fetched"):
        resolve_store("nobody-c3po-test/no-such-store@main")  # offline in the tests: the cache has none
    assert resolve_store(tmp_path) == tmp_path
    assert parse_hub_spec("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    assert parse_hub_spec("org/name") == ("org/name", None)
    for spec in ("name", "a/b/c", "../x", "org/na me", "/abs/path", "org/name@"):
        assert parse_hub_spec(spec) is None, spec


def test_inspect_reads_a_hub_store(hub_cache, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    assert c3po(["inspect", "org/refs@v1"]) == 0
    assert "records   12 in 2 shards" in capsys.readouterr().out


class _RecordingApi:
    calls: list = []

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return "https://huggingface.co/datasets/org/refs/commit/123"


def test_push_uploads_a_finished_store_only(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingApi)
    _RecordingApi.calls = []
    store = _store(tmp_path / "store", 20)
    (store / "notes.txt").write_text("not part of the store")
    assert c3po(["push-reference", str(store), "org/refs", "--revision", "v2", "--private"]) == 0
    assert "use it as reference=org/refs@v2" in capsys.readouterr().out
    (create, repo, create_kwargs), (branch, _, branch_kwargs), (upload, upload_kwargs) = _RecordingApi.calls
    assert (create, repo, create_kwargs) == ("create_repo", "org/refs",
                                             {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert branch == "create_branch" and branch_kwargs == {"repo_type": "dataset", "branch": "v2", "exist_ok": True}
    assert upload == "upload_folder"
    assert upload_kwargs["repo_id"] == "org/refs" and upload_kwargs["repo_type"] == "dataset"
    assert upload_kwargs["revision"] == "v2" and upload_kwargs["folder_path"] == str(store)
    files = upload_kwargs["allow_patterns"]
    assert files == store_files(store) and files[0] == "manifest.json" and len(files) == 1 + 2 * 3
    assert all((store / f).is_file() for f in files) and "notes.txt" not in files

    # What was pushed is a store that resolves and loads from a cache laid out as the Hub would.
    snapshot = tmp_path / "hub" / "datasets--org--refs" / "snapshots" / MAIN_SHA
    for f in files:
        (snapshot / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(store / f, snapshot / f)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(MAIN_SHA)
    assert _resolve_offline(tmp_path / "hub", tmp_path, "org/refs")["org/refs"] == [str(snapshot), 20]


def test_push_refuses_unfinished_or_bad_input(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingApi)
    _RecordingApi.calls = []
    unfinished = tmp_path / "unfinished"
    with pytest.raises(KeyboardInterrupt):  # killed after its first shard: an unfinished build
        with StoreWriter(unfinished, synthetic_manifest(L, E, 2, D, limit=20), shard_size=8, keep="all") as writer:
            for record in synthetic_records(10, L, E, D):
                writer.add(record)
            raise KeyboardInterrupt
    with pytest.raises(StoreIncompleteError):
        push_store(unfinished, "org/refs")
    assert c3po(["push-reference", str(unfinished), "org/refs"]) == 1
    assert "unfinished build" in capsys.readouterr().err
    store = _store(tmp_path / "store", 10)
    assert c3po(["push-reference", str(store), "org/refs@v1"]) == 1
    assert "give the branch with --revision" in capsys.readouterr().err
    assert _RecordingApi.calls == []
