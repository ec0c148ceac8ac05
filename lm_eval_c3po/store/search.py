"""Cosine neighbour search over unit-norm embeddings: k-NN and epsilon-balls, with exclusion and dedup.

Results are exact and deterministic: every similarity is the float32 inner
product of FAISS's flat kernel (``fvec_inner_product``, what a single-threaded
``IndexFlatIP`` search returns), and rows are ordered by similarity, then row
index. ``IndexFlatIP`` itself switches to BLAS for multi-threaded single
queries and for large batches, which changes last bits with the thread count
and the batch; scoring through ``compute_distance_subset`` keeps one kernel.
Near-duplicates of the query (cosine > ``dedup``) are dropped because a
reference that *is* the test question leaks its answer into the re-mixed
pathway; the test is strict (``>``) and done in float32.

Why a first pass: an exact scan reads all N x D floats (154 MB at 100k x
384), ~11-14 ms per query here, bound by memory bandwidth. Stores of
``prefilter_min_rows`` or more also keep int8 codes (``Int8Prefilter``, 38 MB
at 100k) whose scan takes ~3.5 ms on one core and returns candidates plus a
proven ceiling on every other row's exact score. The candidates are
re-scored exactly and the answer is kept only if the k-th kept score beats
the ceiling; otherwise the candidate set widens (x8), and past size / 8
every row is scored. Each path gives the same answer; only the time differs.

Measured on the 2-core AVX2 dev machine (100k x 384, one query): FAISS's
scalar quantizers with float queries (SQ8, SQ8-uniform, fp16, bf16) save at
most half of the fp32 scan, as they decode every code to float; torch int8,
fp16 and bf16 matmuls take 35-670 ms on this CPU. A second OpenMP thread
does not help one query (FAISS parallelises over queries; the idle thread
waits at a barrier, 3-5x slower on a loaded machine), hence
``_one_faiss_thread``; two int8 shards scanned by two threads take 0.6-0.7x
the time of one scan on an idle machine, and about the same on a busy one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import faiss
import numpy as np

from lm_eval_c3po.store.prefilter import MAX_SHARDS, Int8Prefilter, integer_kernel_is_exact

DEFAULT_DEDUP = 0.95
PREFILTER_MIN_ROWS = 10_000  # below this an exact scan takes ~1 ms: codes would save little
MIN_CANDIDATES = 64
WIDEN = 8  # candidate-set growth per failed round; past size / WIDEN the exact scan is cheaper


def _as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    q = np.array(queries, dtype=np.float32, copy=True, ndmin=2)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(
            f"queries must be [Q, {dim}] embeddings from the store's embedder, got shape {np.shape(queries)}"
        )
    if not np.isfinite(q).all():
        raise ValueError("queries contain NaN/inf")
    faiss.normalize_L2(q)  # cosine even if the caller's vectors are not exactly unit-norm
    return q


def _exclusions(exclude: Sequence[Iterable[int]] | None, n_queries: int) -> list[set[int]]:
    excluded = [set(map(int, e)) for e in exclude] if exclude is not None else [set()] * n_queries
    if len(excluded) != n_queries:
        raise ValueError(f"exclude has {len(excluded)} entries for {n_queries} queries")
    return excluded


def _keep_mask(sims: np.ndarray, idx: np.ndarray, excluded: set[int], dedup: float | None) -> np.ndarray:
    keep = idx >= 0
    if dedup is not None:
        keep &= sims <= np.float32(dedup)
    if excluded:
        keep &= ~np.isin(idx, list(excluded))
    return keep


def _ordered(sims: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((idx, -sims))  # by similarity descending, then row ascending
    return sims[order], idx[order]


def _best(
    sims: np.ndarray, idx: np.ndarray, k: int, excluded: set[int], dedup: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """The first k kept rows of ``(sims, idx)`` in result order; a partition first, so whole-store input is cheap."""
    keep = _keep_mask(sims, idx, excluded, dedup)
    sims, idx = sims[keep], idx[keep]
    if len(sims) > k:
        top = sims >= np.partition(sims, len(sims) - k)[len(sims) - k]  # the k best, and any ties with the k-th
        sims, idx = sims[top], idx[top]
    sims, idx = _ordered(sims, idx)
    return sims[:k], idx[:k]


@contextmanager
def _one_faiss_thread() -> Iterator[int]:
    """Run this thread's FAISS calls on one OpenMP thread (the count is per thread); yields the count before.

    FAISS parallelises these calls over queries, so for a single query a
    second OpenMP thread only waits at a barrier, which costs milliseconds
    on a loaded machine; the prefilter's shards use the cores instead.
    """
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield before
    finally:
        faiss.omp_set_num_threads(before)


class _KeepAlive:
    """Exposes FAISS-owned memory as an array whose base keeps the index alive (no dangling views)."""

    def __init__(self, owner: object, view: np.ndarray):
        self.owner = owner
        self.__array_interface__ = view.__array_interface__


class NeighbourIndex:
    """Exact inner-product search on unit-norm vectors (so scores are cosines), with an int8 first pass.

    ``stats`` counts how k-NN queries were answered: ``"first_pass"`` (the
    first candidate set was proven complete), ``"widened"`` (a larger one was)
    or ``"exhaustive"`` (every row scored).
    """

    def __init__(
        self, embeddings: np.ndarray, *, prefilter_min_rows: int = PREFILTER_MIN_ROWS, shards: int | None = None
    ):
        """``shards``: int8 blocks scanned in parallel, by default one per FAISS thread (at most ``MAX_SHARDS``)."""
        self.size, self.dim = embeddings.shape
        self._index = faiss.IndexFlatIP(self.dim)
        self._index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
        shards = min(shards or faiss.omp_get_max_threads(), MAX_SHARDS)
        use_prefilter = self.size >= max(prefilter_min_rows, WIDEN * MIN_CANDIDATES * shards)
        use_prefilter = use_prefilter and integer_kernel_is_exact(self.dim)
        self._prefilter = Int8Prefilter(self.vectors, shards) if use_prefilter else None
        self.stats: Counter[str] = Counter()

    @property
    def vectors(self) -> np.ndarray:
        """The indexed vectors, read-only [size, dim], shared with FAISS rather than kept twice."""
        raw = faiss.rev_swig_ptr(self._index.get_xb(), self.size * self.dim)
        out = np.asarray(_KeepAlive(self._index, raw)).reshape(self.size, self.dim)
        out.flags.writeable = False
        return out

    def _scores(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact similarities of queries ``q`` [P, D] to their own ``rows`` [P, m]: float32 [P, m]."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        out = np.empty(rows.shape, dtype=np.float32)
        self._index.compute_distance_subset(
            len(q), faiss.swig_ptr(q), rows.shape[1], faiss.swig_ptr(out), faiss.swig_ptr(rows)
        )
        return out

    def _all_scores(self, q_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact similarities of one query [1, D] to every row: ``(sims [N], rows [N])``."""
        rows = np.arange(self.size, dtype=np.int64)
        return self._scores(q_row, rows[None])[0], rows

    def knn(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: Sequence[Iterable[int]] | None = None,
        dedup: float | None = DEFAULT_DEDUP,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar rows per query: ``(sims [Q, k] float32, idx [Q, k] int64)``, best first.

        ``exclude[q]`` lists rows never returned for query q. When exclusion and
        dedup leave fewer than k rows in the whole store, the tail is padded with
        idx -1 and sim -inf (the FAISS convention).
        """
        q = _as_queries(queries, self.dim)
        if not 1 <= k <= self.size:
            raise ValueError(
                f"k={k} neighbours asked for, but the store holds {self.size} references; "
                f"use 1 <= k <= {self.size} or build a larger store"
            )
        excluded = _exclusions(exclude, len(q))
        out_sims = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_idx = np.full((len(q), k), -1, dtype=np.int64)
        pending = np.arange(len(q))
        with _one_faiss_thread() as threads:
            if self._prefilter is not None:
                # Room for the k, the excluded rows and as many near-duplicates, with a margin for the ceiling.
                m = max(MIN_CANDIDATES, 4 * (k + max(map(len, excluded), default=0) + (k if dedup is not None else 0)))
                outcome = "first_pass"
                while len(pending) and m * self._prefilter.shards <= self.size // WIDEN:
                    found = self._knn_candidates(q, pending, m, threads, k, excluded, dedup, (out_sims, out_idx))
                    self.stats[outcome] += len(pending) - len(found)
                    pending, m, outcome = found, m * WIDEN, "widened"
            for qi in pending:
                s, i = _best(*self._all_scores(q[qi : qi + 1]), k, excluded[qi], dedup)
                out_sims[qi, : len(s)], out_idx[qi, : len(i)] = s, i
        self.stats["exhaustive"] += len(pending)
        return out_sims, out_idx

    def _knn_candidates(
        self,
        q: np.ndarray,
        pending: np.ndarray,
        m: int,
        threads: int,
        k: int,
        excluded: list[set[int]],
        dedup: float | None,
        out: tuple[np.ndarray, np.ndarray],
    ) -> np.ndarray:
        """Answer the pending queries whose int8 candidates provably hold their k best rows; return the rest."""
        rows, ceiling = self._prefilter.candidates(q[pending], m, threads)
        sims = self._scores(q[pending], rows)
        unproven = []
        for r, qi in enumerate(pending):
            s, i = _best(sims[r], rows[r], k, excluded[qi], dedup)
            # Every row outside the candidates scores <= ceiling < the k-th kept score: none can enter, even on a tie.
            if len(i) == k and ceiling[r] < s[-1]:
                out[0][qi], out[1][qi] = s, i
            else:
                unproven.append(qi)
        return np.array(unproven, dtype=np.int64)

    def within(
        self,
        queries: np.ndarray,
        eps: float,
        *,
        exclude: Sequence[Iterable[int]] | None = None,
        dedup: float | None = DEFAULT_DEDUP,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, all rows with cosine distance ``1 - cos <= eps``: ``(sims, idx)``, best first.

        Every row is scored exactly (a ball can hold most of the store, so no first pass), with the
        same kernel as ``knn``: a row's similarity is the same float32 in both.
        """
        if not 0 <= eps <= 2:
            raise ValueError(f"eps is a cosine distance in [0, 2], got {eps}")
        q = _as_queries(queries, self.dim)
        excluded = _exclusions(exclude, len(q))
        floor = np.float32(1.0 - eps)
        out = []
        with _one_faiss_thread():
            for qi in range(len(q)):
                sims, rows = self._all_scores(q[qi : qi + 1])
                inside = sims >= floor
                s, i = _ordered(sims[inside], rows[inside])
                keep = _keep_mask(s, i, excluded[qi], dedup)
                out.append((s[keep], i[keep]))
        return out
