"""Cosine neighbour search over unit-norm embeddings: k-NN and epsilon-balls, with exclusion and dedup.

FAISS ``IndexFlatIP`` is exact, so retrieval is deterministic (ties broken by
row index). Near-duplicates of the query (cosine > ``dedup``) are dropped
because a reference that *is* the test question leaks its answer into the
re-mixed pathway; the test is strict (``>``) and done in float32, the
precision FAISS scores in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import faiss
import numpy as np

DEFAULT_DEDUP = 0.95


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


class _KeepAlive:
    """Exposes FAISS-owned memory as an array whose base keeps the index alive (no dangling views)."""

    def __init__(self, owner: object, view: np.ndarray):
        self.owner = owner
        self.__array_interface__ = view.__array_interface__


class NeighbourIndex:
    """An exact inner-product index (``IndexFlatIP``) on unit-norm vectors, so scores are cosines."""

    def __init__(self, embeddings: np.ndarray):
        self.size, self.dim = embeddings.shape
        self._index = faiss.IndexFlatIP(self.dim)
        self._index.add(np.ascontiguousarray(embeddings, dtype=np.float32))

    @property
    def vectors(self) -> np.ndarray:
        """The indexed vectors, read-only [size, dim], shared with FAISS rather than kept twice."""
        raw = faiss.rev_swig_ptr(self._index.get_xb(), self.size * self.dim)
        out = np.asarray(_KeepAlive(self._index, raw)).reshape(self.size, self.dim)
        out.flags.writeable = False
        return out

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
        excluded = [set(map(int, e)) for e in exclude] if exclude is not None else [set()] * len(q)
        if len(excluded) != len(q):
            raise ValueError(f"exclude has {len(excluded)} entries for {len(q)} queries")
        out_sims = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_idx = np.full((len(q), k), -1, dtype=np.int64)
        pending = np.arange(len(q))
        fetch = min(self.size, k + max(map(len, excluded), default=0) + (k if dedup is not None else 0))
        while len(pending):
            sims, idx = self._index.search(q[pending], fetch)
            short = []
            for row, qi in enumerate(pending):
                s, i = _ordered(sims[row], idx[row])
                keep = _keep_mask(s, i, excluded[qi], dedup)
                s, i = s[keep][:k], i[keep][:k]
                out_sims[qi, : len(s)], out_idx[qi, : len(i)] = s, i
                if len(i) < k and fetch < self.size:
                    short.append(qi)
            pending = np.array(short, dtype=np.int64)
            fetch = min(self.size, fetch * 4)
        return out_sims, out_idx

    def within(
        self,
        queries: np.ndarray,
        eps: float,
        *,
        exclude: Sequence[Iterable[int]] | None = None,
        dedup: float | None = DEFAULT_DEDUP,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, all rows with cosine distance ``1 - cos <= eps``: ``(sims, idx)``, best first."""
        if not 0 <= eps <= 2:
            raise ValueError(f"eps is a cosine distance in [0, 2], got {eps}")
        q = _as_queries(queries, self.dim)
        excluded = [set(map(int, e)) for e in exclude] if exclude is not None else [set()] * len(q)
        if len(excluded) != len(q):
            raise ValueError(f"exclude has {len(excluded)} entries for {len(q)} queries")
        floor = np.float32(1.0 - eps)
        # FAISS returns IP > radius; step one float below the floor so cos == floor is included.
        lims, sims, idx = self._index.range_search(q, float(np.nextafter(floor, np.float32(-np.inf))))
        out = []
        for qi in range(len(q)):
            s, i = _ordered(sims[lims[qi] : lims[qi + 1]], idx[lims[qi] : lims[qi + 1]].astype(np.int64))
            keep = _keep_mask(s, i, excluded[qi], dedup) & (s >= floor)
            out.append((s[keep], i[keep]))
        return out
