"""From test texts to their neighbourhoods: embedding, store search, selection, kernel weights."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lm_eval_c3po.retrieve.kernels import KernelSpec, as_kernel_spec, kernel_weights_from_cosine
from lm_eval_c3po.retrieve.neighbourhood import Neighbours, epsilon_ball, k_nearest
from lm_eval_c3po.store import ReferenceStore

EPS_BALL_CANDIDATES = 64  # an epsilon-ball is searched among this many nearest references


class Retriever:
    """N(x) and the kernel weights ``K(x_i, x) / sum_j K(x_j, x)`` for each test text.

    The k nearest references by cosine (or those within an epsilon-ball),
    near-duplicates of the question (cosine above ``dedup``) dropped by the
    store's search; weights are zero on padding.
    """

    def __init__(self, store: ReferenceStore, embedder, *, k: int, eps: float | None = None,
                 dedup: float | None = None, kernel: str | KernelSpec = "gaussian", bandwidth: float | None = None):
        if k > len(store):
            raise ValueError(
                f"k={k} neighbours asked for, but the reference store holds only {len(store)} "
                "references: lower k or build a larger store"
            )
        self.store, self.embedder = store, embedder
        self.k, self.eps, self.dedup, self.bandwidth = k, eps, dedup, bandwidth
        self.kernel = as_kernel_spec(kernel)

    def __call__(self, texts: Sequence[str]) -> tuple[Neighbours, torch.Tensor]:
        queries = self.embedder.encode(list(texts))
        if self.eps is None:
            sims, idx = self.store.knn(queries, self.k, dedup=self.dedup)
            found = k_nearest(torch.from_numpy(sims), torch.from_numpy(idx), k=self.k)
        else:
            sims, idx = self.store.knn(queries, min(EPS_BALL_CANDIDATES, len(self.store)), dedup=self.dedup)
            found = epsilon_ball(torch.from_numpy(sims), torch.from_numpy(idx), self.eps)
        weights = kernel_weights_from_cosine(found.similarities.float(), self.kernel, self.bandwidth,
                                             valid=found.valid)
        return found, torch.where(found.valid, weights, torch.zeros_like(weights))

    def pathways(self, neighbours: Neighbours, layer_ids: Sequence[int]) -> torch.Tensor:
        """The neighbours' stored pathways ``[B, m, L_crit, E]`` (padding rows repeat reference 0)."""
        rows = neighbours.indices.clamp_min(0).numpy()
        return torch.from_numpy(np.asarray(self.store.routing[rows][..., list(layer_ids), :]))
