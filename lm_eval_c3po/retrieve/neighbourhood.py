"""The neighbourhood N(x) of a test context, picked from retrieved candidates.

C3PO (arXiv 2504.07964) re-mixes from the references nearest to the
test context x in embedding space, either its k nearest neighbours (default
k = 3) or an epsilon-ball. The store runs the FAISS inner-product search on
unit-norm embeddings and hands over, per context, candidate rows of cosine
similarities and reference ids (``-1`` marks a missing result, as FAISS does).
These functions only select among those candidates; they do no search.

The epsilon-ball is defined on the cosine: ``cos(x_i, x) >= 1 - epsilon``
(equivalently a Euclidean ball of radius ``sqrt(2 epsilon)`` on the unit
sphere). It can only contain candidates the store retrieved, so the store's
candidate count caps its size. If the ball is empty, the single nearest
candidate is used and the context is flagged (``fallback``), so a run can
report how often the ball was too small.

Order: neighbours come sorted by decreasing similarity, ties broken by the
lower reference id, so the selection does not depend on FAISS's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Neighbours:
    """Selected neighbours, ``[..., m]`` padded; padding has ``valid=False``.

    Attributes:
        indices: reference ids (long), ``-1`` where not valid.
        similarities: cosine similarities, NaN where not valid.
        valid: which entries are neighbours.
        fallback: ``[...]``, True where an empty epsilon-ball fell back to the
            single nearest candidate (always False for k-NN).
    """

    indices: Tensor
    similarities: Tensor
    valid: Tensor
    fallback: Tensor

    def take(self, contexts: Tensor) -> Neighbours:
        """The neighbours of the contexts ``contexts`` (an index into the leading dimension)."""
        return Neighbours(self.indices[contexts], self.similarities[contexts], self.valid[contexts],
                          self.fallback[contexts])


def _sorted_candidates(similarities: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Candidates sorted by similarity (desc), ties by id (asc); invalid ones last and padded."""
    similarities = torch.as_tensor(similarities)
    indices = torch.as_tensor(indices, dtype=torch.long, device=similarities.device)
    if similarities.shape != indices.shape or similarities.ndim < 1 or similarities.shape[-1] < 1:
        raise ValueError(
            f"similarities {tuple(similarities.shape)} and indices {tuple(indices.shape)} "
            "must have the same shape [..., n], n >= 1"
        )
    valid = (indices >= 0) & torch.isfinite(similarities)
    id_key = torch.where(valid, indices, torch.full_like(indices, torch.iinfo(torch.long).max))
    by_id = torch.argsort(id_key, dim=-1, stable=True)
    sim_key = torch.where(valid, similarities, torch.full_like(similarities, -torch.inf)).gather(-1, by_id)
    order = by_id.gather(-1, torch.argsort(sim_key, dim=-1, descending=True, stable=True))
    valid = valid.gather(-1, order)
    sims = torch.where(valid, similarities.gather(-1, order), torch.full_like(similarities, torch.nan))
    ids = torch.where(valid, indices.gather(-1, order), torch.full_like(indices, -1))
    return sims, ids, valid


def k_nearest(similarities: Tensor, indices: Tensor, k: int = 3) -> Neighbours:
    """The ``k`` most similar valid candidates per row, ``[..., k]``.

    Rows with fewer than ``k`` valid candidates are padded with invalid entries.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sims, ids, valid = _sorted_candidates(similarities, indices)
    missing = k - sims.shape[-1]
    if missing > 0:
        pad = (0, missing)
        sims = torch.nn.functional.pad(sims, pad, value=torch.nan)
        ids = torch.nn.functional.pad(ids, pad, value=-1)
        valid = torch.nn.functional.pad(valid, pad, value=False)
    fallback = torch.zeros(valid.shape[:-1], dtype=torch.bool, device=valid.device)
    return Neighbours(ids[..., :k], sims[..., :k], valid[..., :k], fallback)


def epsilon_ball(similarities: Tensor, indices: Tensor, epsilon: float) -> Neighbours:
    """All valid candidates with ``cos >= 1 - epsilon``, ``[..., n]`` (padded).

    An empty ball falls back to the nearest valid candidate (``fallback``
    True). A row with no valid candidate at all has no neighbour.
    """
    if not 0.0 <= epsilon <= 2.0:
        raise ValueError(f"epsilon must be in [0, 2] (cosine radius), got {epsilon}")
    sims, ids, valid = _sorted_candidates(similarities, indices)
    in_ball = valid & (sims >= 1.0 - epsilon)
    fallback = ~in_ball.any(dim=-1) & valid[..., 0]
    first = torch.zeros_like(in_ball)
    first[..., 0] = True
    in_ball = in_ball | (first & fallback.unsqueeze(-1))
    sims = torch.where(in_ball, sims, torch.full_like(sims, torch.nan))
    ids = torch.where(in_ball, ids, torch.full_like(ids, -1))
    return Neighbours(ids, sims, in_ball, fallback)
