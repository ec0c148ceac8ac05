"""Neighbour search: k-NN, near-duplicate filter (exact boundary), epsilon-balls, exclusion, merge."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lm_eval_c3po.store import ReferenceStore, StoreMismatchError, StoreWriter
from lm_eval_c3po.store.synthetic import synthetic_manifest, synthetic_record

L, E = 2, 4
T95 = np.float32(0.95)
ABOVE = np.nextafter(T95, np.float32(1))  # the smallest float32 cosine above the threshold


def unit(cos: float) -> np.ndarray:
    """A 2-d unit vector whose inner product with [1, 0] is exactly ``cos`` in float32."""
    c = np.float32(cos)
    return np.array([c, np.sqrt(np.float32(1) - c * c)], dtype=np.float32)


def write(path, embeddings, tasks=("t",), model_id="synthetic/moe", **build):
    dim = embeddings.shape[1]
    with StoreWriter(path, synthetic_manifest(L, E, 2, dim, model_id=model_id, **build), keep="all") as writer:
        for i, e in enumerate(embeddings):
            r = synthetic_record(i, L, E, dim, tasks=tasks)
            r.embedding = e
            writer.add(r)
    return ReferenceStore.load(path)


@pytest.fixture
def boundary_store(tmp_path):
    # rows: exact duplicate, cos == threshold, cos just above it, two far ones
    return write(tmp_path / "b", np.stack([unit(1.0), unit(T95), unit(ABOVE), unit(0.5), unit(0.2)]))


QUERY = np.array([[1.0, 0.0]], dtype=np.float32)


def test_dedup_drops_exactly_the_refs_above_the_threshold(boundary_store):
    sims, idx = boundary_store.knn(QUERY, 2)  # default dedup 0.95
    assert idx.tolist() == [[1, 3]] and sims[0, 0] == T95  # cos == 0.95 is kept, cos > 0.95 dropped
    sims, idx = boundary_store.knn(QUERY, 3, dedup=None)
    assert idx.tolist() == [[0, 2, 1]] and sims[0, 0] == 1.0
    _, idx = boundary_store.knn(QUERY, 2, dedup=0.5)
    assert idx.tolist() == [[3, 4]]


def test_knn_pads_when_filters_leave_fewer_than_k(boundary_store):
    sims, idx = boundary_store.knn(QUERY, 5)
    assert idx.tolist() == [[1, 3, 4, -1, -1]] and np.isneginf(sims[0, 3:]).all()


def test_k_larger_than_store_is_a_clear_error(boundary_store):
    with pytest.raises(ValueError, match="k=6 neighbours.*holds 5 references"):
        boundary_store.knn(QUERY, 6)
    with pytest.raises(ValueError, match=r"queries must be \[Q, 2\]"):
        boundary_store.knn(np.ones((1, 3), np.float32), 1)


def test_epsilon_ball_is_inclusive_and_filtered(boundary_store):
    (sims, idx), = boundary_store.within(QUERY, 1 - 0.95, dedup=None)
    assert idx.tolist() == [0, 2, 1]  # 1 - cos <= eps, boundary (cos == 0.95) included
    (sims, idx), = boundary_store.within(QUERY, 1 - 0.95)
    assert idx.tolist() == [1]
    (sims, idx), = boundary_store.within(QUERY, 0.6, exclude=[[3]])
    assert idx.tolist() == [1] and sims.dtype == np.float32
    assert [len(i) for _, i in boundary_store.within(np.stack([QUERY[0], unit(0.2)]), 1e-6, dedup=None)] == [1, 1]


def test_stored_question_finds_itself_first_unless_dedup(tmp_path):
    emb = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    store = write(tmp_path / "s", emb, tasks=("a", "b"))
    sims, idx = store.knn(store.embeddings[:10], 3, dedup=None)
    assert idx[:, 0].tolist() == list(range(10)) and np.allclose(sims[:, 0], 1, atol=1e-6)
    sims, idx = store.knn(store.embeddings[:10], 3)
    assert not (idx == np.arange(10)[:, None]).any() and (sims <= T95).all()
    # exclusion by row or by record id; unknown ids are ignored
    _, by_row = store.knn(store.embeddings[:2], 3, exclude=[[0], [1, 7]], dedup=None)
    ids = store.ids
    _, by_id = store.knn(store.embeddings[:2], 3, exclude=[[ids[0]], [ids[1], ids[7], "x/9"]], dedup=None)
    assert by_row.tolist() == by_id.tolist() and 0 not in by_row[0] and {1, 7}.isdisjoint(by_row[1])
    # single 1-d query, results agree with brute force
    sims, idx = store.knn(emb[5] * 3, 4, dedup=None)  # not unit-norm: cosine anyway
    assert idx[0].tolist() == np.argsort(-(emb @ emb[5]), kind="stable")[:4].tolist()


def test_merge_in_memory_and_to_disk(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(20, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    a = write(tmp_path / "a", emb[:12], tasks=("openbookqa",))
    b = write(tmp_path / "b", emb[12:], tasks=("sciq",))
    merged = ReferenceStore.merge([a, b])
    assert len(merged) == 20 and list(merged.sources) == ["openbookqa", "sciq"]
    np.testing.assert_array_equal(merged.embeddings, emb)
    np.testing.assert_array_equal(merged.routing, np.concatenate([a.routing, b.routing]))
    assert merged.knn(emb[13], 1, dedup=None)[1].tolist() == [[13]]
    assert merged.choice_ids(15)[0].tolist() == b.choice_ids(3)[0].tolist()

    merged.save(tmp_path / "m", shard_size=7)
    again = ReferenceStore.load(tmp_path / "m", expect=a.model, embedder=a.embedder)
    assert again.ids == merged.ids and again.sources == merged.sources
    np.testing.assert_array_equal(again.routing, merged.routing)
    assert [m["path"] for m in again.manifest.build["merged_from"]] == [str(tmp_path / "a"), str(tmp_path / "b")]

    with pytest.raises(ValueError, match="'sciq' is in two stores"):
        ReferenceStore.merge([b, b])
    renamed = write(tmp_path / "r", emb[:3], tasks=("piqa",), model_id="other/moe")
    assert len(ReferenceStore.merge([a, renamed])) == 15  # same fingerprints and shape: only the name differs
    manifest = synthetic_manifest(L, E, 2, emb.shape[1], model_id="other/moe")
    manifest = replace(manifest, model=replace(manifest.model, config_fingerprint="f" * 16))
    with StoreWriter(tmp_path / "o", manifest, keep="all") as writer:
        for i, e in enumerate(emb[:3]):
            record = synthetic_record(i, L, E, emb.shape[1], tasks=("piqa",))
            record.embedding = e
            writer.add(record)
    other = ReferenceStore.load(tmp_path / "o")
    with pytest.raises(StoreMismatchError, match="built for other/moe@main.*the model is synthetic/moe@main"):
        ReferenceStore.merge([a, other])
