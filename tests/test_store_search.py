"""Neighbour search: k-NN, near-duplicate filter (exact boundary), epsilon-balls, exclusion, merge."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import replace

import faiss
import numpy as np
import pytest

from lm_eval_c3po.store import ReferenceStore, StoreMismatchError, StoreWriter
from lm_eval_c3po.store.prefilter import Int8Prefilter, integer_kernel_is_exact
from lm_eval_c3po.store.search import NeighbourIndex
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


# -- the int8 first pass: always the exact answer --------------------------------------------------


def unit_rows(rng, n, dim):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@contextmanager
def faiss_threads(n):
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def flat_knn(emb, queries, k, exclude=None, dedup=0.95):
    """The plain IndexFlatIP answer: every row scored on one thread (FAISS's sequential kernel), then filtered."""
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    q = np.array(queries, dtype=np.float32, ndmin=2)
    faiss.normalize_L2(q)
    with faiss_threads(1):
        all_sims, all_idx = index.search(q, len(emb))
    sims, idx = np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1)
    for r, (s, i) in enumerate(zip(all_sims, all_idx)):
        order = np.lexsort((i, -s))
        s, i = s[order], i[order]
        keep = ~np.isin(i, list(exclude[r]) if exclude else [])
        if dedup is not None:
            keep &= s <= np.float32(dedup)
        sims[r, : min(k, keep.sum())], idx[r, : min(k, keep.sum())] = s[keep][:k], i[keep][:k]
    return sims, idx


def assert_same(got, want):
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])  # bit-identical float32 cosines


@pytest.mark.parametrize("dim", [32, 24])  # 24: not a multiple of 16, so FAISS's generic int8 kernel
def test_first_pass_is_the_flat_answer_on_random_data(dim):
    rng = np.random.default_rng(dim)
    emb = unit_rows(rng, 3000, dim)
    index = NeighbourIndex(emb, prefilter_min_rows=0, shards=2)
    assert index._prefilter is not None
    queries = np.concatenate([emb[:20], emb[20:40] + rng.normal(scale=0.3, size=(20, dim)).astype(np.float32)])
    exclude = [set(rng.integers(0, 3000, size=int(rng.integers(0, 6))).tolist()) | {i} for i in range(40)]
    for k, dedup, excl in [(1, 0.95, None), (3, 0.95, None), (3, None, None), (10, 0.95, exclude), (10, None, exclude)]:
        assert_same(index.knn(queries, k, exclude=excl, dedup=dedup), flat_knn(emb, queries, k, excl, dedup))
    assert index.stats["first_pass"] > 150 and index.stats["exhaustive"] == 0
    _, idx = index.knn(emb[:20], 3, dedup=None)
    assert idx[:, 0].tolist() == list(range(20))  # a stored question finds itself first ...
    _, idx = index.knn(emb[:20], 3)
    assert not (idx == np.arange(20)[:, None]).any()  # ... unless dedup is on


def test_a_query_gets_the_same_answer_alone_or_in_a_batch_on_any_thread_count():
    rng = np.random.default_rng(1)
    emb = unit_rows(rng, 3000, 32)
    index = NeighbourIndex(emb, prefilter_min_rows=0, shards=2)
    queries = unit_rows(rng, 40, 32)
    with faiss_threads(2):  # shards scanned in parallel
        batch = index.knn(queries, 5)
    with faiss_threads(1):  # one after the other
        singles = [index.knn(q, 5) for q in queries]
    assert_same(batch, (np.concatenate([s for s, _ in singles]), np.concatenate([i for _, i in singles])))
    assert_same(batch, flat_knn(emb, queries, 5))


def test_near_ties_widen_the_candidates_then_fall_back_to_every_row():
    rng = np.random.default_rng(2)
    dim = 32
    centre = unit_rows(rng, 1, dim)[0]
    # 300 rows within 1e-4 of one another, more than the first candidate set (2 shards x 64) holds:
    # their int8 scores cannot separate them, so the first pass proves nothing and the set widens.
    cluster = centre + rng.normal(scale=1e-4, size=(300, dim)).astype(np.float32)
    emb = np.concatenate([unit_rows(rng, 4000, dim), cluster, unit_rows(rng, 4500, dim)])
    emb[5000:5010] = emb[4100]  # exact duplicates of a cluster row: equal cosines, ordered by row
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = NeighbourIndex(emb, prefilter_min_rows=0, shards=2)
    queries = np.stack([centre, emb[4100], centre + 0.01])
    assert_same(index.knn(queries, 10, dedup=None), flat_knn(emb, queries, 10, dedup=None))
    assert index.stats == Counter(widened=3)
    # 2000 near-equal rows: more than the widest candidate set, so every row is scored.
    emb[:2000] = centre + rng.normal(scale=1e-5, size=(2000, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = NeighbourIndex(emb, prefilter_min_rows=0, shards=2)
    excl = [set(range(0, 2000, 3))]
    assert_same(index.knn(centre, 50, exclude=excl), flat_knn(emb, centre, 50, excl))
    assert index.stats == Counter(exhaustive=1)
    zero = index.knn(np.zeros(dim, np.float32), 3, dedup=None)  # all cosines 0: pure row-order tie-break
    assert zero[1].tolist() == [[0, 1, 2]] and index.stats["exhaustive"] == 2


def test_k_near_the_store_size_pads_like_the_flat_index():
    rng = np.random.default_rng(3)
    emb = unit_rows(rng, 1100, 16)
    emb[:5] = emb[5]  # copies of row 5, query 0: dedup drops all six
    index = NeighbourIndex(emb, prefilter_min_rows=0, shards=2)
    assert index._prefilter is not None
    queries, excl = emb[[5, 7]], [set(range(100, 130)), set()]
    for k in (1090, 1100):
        got = index.knn(queries, k, exclude=excl)
        assert_same(got, flat_knn(emb, queries, k, excl))
        assert (got[1][0] == -1).sum() == k - (1100 - 6 - 30) and np.isneginf(got[0][got[1] == -1]).all()
    assert index.stats == Counter(exhaustive=4)  # such k need more candidates than a first pass offers


def test_epsilon_ball_has_the_knn_cosines():
    rng = np.random.default_rng(4)
    emb = unit_rows(rng, 3000, 32)
    index = NeighbourIndex(emb, prefilter_min_rows=0, shards=2)
    queries = emb[:5] + rng.normal(scale=0.1, size=(5, 32)).astype(np.float32)
    balls = index.within(queries, 0.6, dedup=None)
    want = flat_knn(emb, queries, 3000, dedup=None)
    for (s, i), ws, wi in zip(balls, *want):
        inside = ws >= np.float32(0.4)
        np.testing.assert_array_equal(i, wi[inside])
        np.testing.assert_array_equal(s, ws[inside])
    sims, idx = index.knn(queries, 5, dedup=None)
    assert [b[1][:5].tolist() for b in balls] == idx.tolist() and [b[0][:5].tolist() for b in balls] == sims.tolist()


@pytest.mark.parametrize("dim", [384, 32, 24, 5])
def test_integer_kernel_is_exact_for_the_dims_in_use(dim):
    assert integer_kernel_is_exact(dim)


def outlier_rows(rng):
    """Not unit-norm, with one dimension 20x the others: per-dimension steps matter."""
    emb = unit_rows(rng, 2000, 32) * rng.uniform(0.5, 2, size=(2000, 1)).astype(np.float32)
    emb[:, -1] *= 20
    return emb


def grid_rows(rng):
    """Exactly on the int8 grid, so the stored codes have no error: the query's rounding is all of it."""
    codes = rng.integers(-127, 128, size=(2000, 32))
    codes[0] = 127
    return (codes / 127).astype(np.float32)


def dense_rows(rng):
    """Few dimensions, many rows: near-ties everywhere, so the stored codes' error decides."""
    return unit_rows(rng, 4000, 4)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("rows_of", [outlier_rows, grid_rows, dense_rows])
def test_ceiling_bounds_every_row_outside_the_candidates(rows_of, shards):
    rng = np.random.default_rng(5)
    emb = rows_of(rng)
    n, dim = emb.shape
    queries = np.concatenate([unit_rows(rng, 40, dim), emb[:10], np.eye(2, dim, dim - 2, dtype=np.float32)])
    faiss.normalize_L2(queries)  # as NeighbourIndex passes them
    rows, ceiling = Int8Prefilter(emb, shards, chunk_rows=300).candidates(queries, 20, threads=shards)
    exact = flat_knn(emb, queries, n, dedup=None)  # every row, best first
    outside = np.stack([~np.isin(every, mine) for every, mine in zip(exact[1], rows)])
    assert rows.shape == (len(queries), 20 * shards) and (outside.sum(1) == n - 20 * shards).all()
    best_outside = np.where(outside, exact[0], -np.inf).max(axis=1)
    assert (best_outside <= ceiling).all()
    # ... and tight enough to be useful: a few percent of the largest possible score
    assert ((ceiling - best_outside) / np.linalg.norm(emb, axis=1).max() < 0.05).all()
