"""From test texts to their neighbourhoods: embedding, store search, selection, kernel weights.

The kernel bandwidth (``bandwidth=`` in ``--model c3po``):

- ``store`` (default): one bandwidth for the store, from its references' own
  neighbourhoods (:func:`bandwidth_from_neighbour_distances`), computed once at
  load. It is set so that in a typical reference's k-neighbourhood the Gaussian
  weight of the k-th nearest is ``1/e`` of the nearest's: then the kernels
  weight neighbours visibly differently (the paper's kernel ablation, Tables 6
  and 14, compares them).
- ``median``: per test context, the median of its neighbours' distances. Top-k
  sentence-embedding distances are large and close together (cosines 0.8 / 0.75
  / 0.7), so every distance kernel then gives near-uniform weights.
- a number: that bandwidth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lm_eval_c3po.retrieve.kernels import KernelSpec, as_kernel_spec, kernel_weights_from_cosine, sphere_distance
from lm_eval_c3po.retrieve.neighbourhood import Neighbours, epsilon_ball, k_nearest
from lm_eval_c3po.store import ReferenceStore

BANDWIDTH_RULES = ("store", "median")
BANDWIDTH_SAMPLE = 1000  # references whose neighbourhoods set the store bandwidth
BANDWIDTH_SEED = 0


def bandwidth_from_neighbour_distances(distances: np.ndarray) -> float | None:
    """``h`` with ``h^2 = median_i (d_ik^2 - d_i1^2) / 2`` over rows of sorted neighbour distances ``[n, k]``.

    For Gaussian weights ``exp(-d^2 / 2h^2)`` this puts the k-th nearest at ``1/e``
    of the nearest in the median neighbourhood. None when no row has two finite
    distances or the spread is zero (then use the per-context median).
    """
    distances = np.asarray(distances, dtype=np.float64)
    finite = np.isfinite(distances)
    rows = finite.sum(axis=1) >= 2
    if not rows.any():
        return None
    spread = [(d[f][-1] ** 2 - d[f][0] ** 2) / 2 for d, f in zip(distances[rows], finite[rows])]
    h2 = float(np.median(spread))
    return float(np.sqrt(h2)) if h2 > 0 else None


def store_bandwidth(store: ReferenceStore, k: int, dedup: float | None) -> float | None:
    """:func:`bandwidth_from_neighbour_distances` over a seeded sample of the store's references (itself excluded)."""
    rows = np.arange(len(store))
    if len(rows) > BANDWIDTH_SAMPLE:
        rows = np.sort(np.random.default_rng(BANDWIDTH_SEED).choice(rows, BANDWIDTH_SAMPLE, replace=False))
    neighbours = min(max(k, 2), len(store) - 1)
    if neighbours < 2:
        return None
    sims, _ = store.knn(store.embeddings[rows], neighbours, exclude=[[int(r)] for r in rows], dedup=dedup)
    return bandwidth_from_neighbour_distances(sphere_distance(torch.from_numpy(sims).double()).numpy())


class Retriever:
    """N(x) and the kernel weights ``K(x_i, x) / sum_j K(x_j, x)`` for each test text.

    The k nearest references by cosine (or those within an epsilon-ball among
    the ``eps_candidates`` nearest), near-duplicates of the question (cosine
    above ``dedup``) dropped by the store's search; weights are zero on padding.
    """

    def __init__(self, store: ReferenceStore, embedder, *, k: int, eps: float | None = None,
                 eps_candidates: int = 64, dedup: float | None = None, kernel: str | KernelSpec = "gaussian",
                 bandwidth: float | str = "store"):
        if k > len(store):
            raise ValueError(
                f"k={k} neighbours asked for, but the reference store holds only {len(store)} "
                "references: lower k or build a larger store"
            )
        self.store, self.embedder = store, embedder
        self.k, self.eps, self.eps_candidates, self.dedup = k, eps, eps_candidates, dedup
        self.kernel = as_kernel_spec(kernel)
        if bandwidth == "store":
            self.bandwidth: float | None = store_bandwidth(store, k, dedup) if self.kernel.uses_distance else None
        elif bandwidth == "median":
            self.bandwidth = None  # kernels.median_bandwidth per context
        else:
            self.bandwidth = float(bandwidth)

    def __call__(self, texts: Sequence[str]) -> tuple[Neighbours, torch.Tensor]:
        queries = self.embedder.encode_queries(list(texts))
        if self.eps is None:
            sims, idx = self.store.knn(queries, self.k, dedup=self.dedup)
            found = k_nearest(torch.from_numpy(sims), torch.from_numpy(idx), k=self.k)
        else:
            candidates = min(self.eps_candidates, len(self.store))
            sims, idx = self.store.knn(queries, candidates, dedup=self.dedup)
            found = epsilon_ball(torch.from_numpy(sims), torch.from_numpy(idx), self.eps)
        weights = kernel_weights_from_cosine(found.similarities.float(), self.kernel, self.bandwidth,
                                             valid=found.valid)
        return found, torch.where(found.valid, weights, torch.zeros_like(weights))
