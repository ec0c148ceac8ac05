"""Loading refuses bad stores with messages that name the problem, both sides, and the fix."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from lm_eval_c3po.store import (
    EmbedderSignature,
    ReferenceStore,
    StoreCorruptError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreWriter,
)
from lm_eval_c3po.store.columns import Columns
from lm_eval_c3po.store.manifest import ShardInfo
from lm_eval_c3po.store.shards import read_shard, write_shard
from lm_eval_c3po.store.synthetic import synthetic_manifest, synthetic_records

L, E, D = 4, 8, 16


@pytest.fixture
def store_dir(tmp_path):
    with StoreWriter(tmp_path / "s", synthetic_manifest(L, E, 2, D), shard_size=10, keep="all") as writer:
        for r in synthetic_records(25, L, E, D):
            writer.add(r)
    return tmp_path / "s"


def rewrite_shard(store_dir, columns: Columns):
    """Replace shard 0 with ``columns`` and re-record its hashes, as a buggy builder would have written it."""
    path = store_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    old = ShardInfo.from_dict(manifest["shards"][0])
    info = write_shard(store_dir, old.name, columns, [t["id"] for t in columns.texts], old.sources)
    manifest["shards"][0] = info.to_dict()
    path.write_text(json.dumps(manifest))


def first_shard(store_dir) -> Columns:
    info = ShardInfo.from_dict(json.loads((store_dir / "manifest.json").read_text())["shards"][0])
    return read_shard(store_dir, info)


def test_not_a_store_and_unfinished_build(tmp_path):
    with pytest.raises(StoreCorruptError, match="no reference store at .*nowhere.*c3po build-reference"):
        ReferenceStore.load(tmp_path / "nowhere")
    with pytest.raises(StoreCorruptError, match="missing store file .*manifest.json"):
        ReferenceStore.load(tmp_path)
    writer = StoreWriter(tmp_path / "half", synthetic_manifest(L, E, 2, D), shard_size=5)
    for r in synthetic_records(12, L, E, D):
        writer.add(r)
    with pytest.raises(StoreIncompleteError, match="unfinished build.*rerun the same `c3po build-reference`"):
        ReferenceStore.load(tmp_path / "half")


def test_missing_and_corrupt_files_are_named(store_dir):
    shard = store_dir / "shards" / "00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=r"corrupt store file .*00001\.safetensors \(SHA-256.*rebuild"):
        ReferenceStore.load(store_dir)
    shard.write_bytes(bytes(data[:40]))  # truncated: unparsable even without hash checks
    with pytest.raises(StoreCorruptError, match=r"corrupt store file .*00001\.safetensors"):
        ReferenceStore.load(store_dir, verify=False)
    shard.unlink()
    with pytest.raises(StoreCorruptError, match=r"missing store file .*00001\.safetensors.*rebuild"):
        ReferenceStore.load(store_dir)

    (store_dir / "manifest.json").write_text("{not json")
    with pytest.raises(StoreCorruptError, match=r"corrupt store file .*manifest\.json"):
        ReferenceStore.load(store_dir)


def test_future_format_version_is_refused(store_dir):
    path = store_dir / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    with pytest.raises(StoreCorruptError, match="format_version 99 is not supported"):
        ReferenceStore.load(store_dir)


def test_store_of_another_model_names_both_sides(store_dir):
    other = synthetic_manifest(6, 10, 2, D, model_id="other/moe-big").model
    with pytest.raises(StoreMismatchError) as err:
        ReferenceStore.load(store_dir, expect=other)
    msg = str(err.value)
    assert "built for synthetic/moe@main (4x8" in msg and "the model is other/moe-big@main (6x10" in msg
    assert "differs in: model_id, num_layers, num_experts, moe_layers" in msg
    assert "c3po build-reference --model other/moe-big" in msg
    same_shape = replace(synthetic_manifest(L, E, 2, D).model, tokenizer_fingerprint="f" * 16)
    with pytest.raises(StoreMismatchError, match="differs in: tokenizer_fingerprint"):
        ReferenceStore.load(store_dir, expect=same_shape)


def test_embedder_of_another_dimension_names_both_sides(store_dir):
    both_sides = r"embedded with synthetic/embedder \(16-d\).*embedder is nv/embed \(32-d\)"
    with pytest.raises(StoreMismatchError, match=both_sides):
        ReferenceStore.load(store_dir, embedder=EmbedderSignature("nv/embed", 32))
    store = ReferenceStore.load(store_dir)
    with pytest.raises(ValueError, match=r"queries must be \[Q, 16\]"):
        store.knn(np.ones((1, 32), np.float32), 1)


def test_nan_routing_is_refused_at_load(store_dir):
    cols = first_shard(store_dir)
    cols.routing[3, 1, 2] = np.nan
    rewrite_shard(store_dir, cols)
    refused = r"00000\.safetensors is refused: routing has NaN/inf in 1 rows \(first: row 3"
    with pytest.raises(StoreCorruptError, match=refused):
        ReferenceStore.load(store_dir)


def test_shape_mismatch_between_files_is_refused(store_dir):
    cols = first_shard(store_dir)
    rewrite_shard(store_dir, replace(cols, texts=cols.texts[:-1]))
    with pytest.raises(StoreCorruptError, match="9 text rows for 10 tensor rows"):
        ReferenceStore.load(store_dir)
    rewrite_shard(store_dir, replace(cols, routing=cols.routing[:, :3]))
    with pytest.raises(StoreCorruptError, match=r"routing has shape \(10, 3, 8\), expected \(10, 4, 8\)"):
        ReferenceStore.load(store_dir)


def test_same_model_under_another_name_loads_with_a_warning(store_dir, caplog):
    renamed = replace(synthetic_manifest(L, E, 2, D).model, model_id="/local/copy/of/moe", revision="abc123")
    with caplog.at_level("WARNING"):
        store = ReferenceStore.load(store_dir, expect=renamed)
    assert len(store) > 0
    assert any("only model_id, revision differ" in r.getMessage() for r in caplog.records)
