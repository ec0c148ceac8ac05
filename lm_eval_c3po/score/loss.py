"""The neighbourhood loss of NGD and kernel regression's alpha search.

``L(omega) = sum_i w_i l_i(omega) / sum_i w_i`` for every test context, with
omega written at example i's context token positions in the critical layers.
The paper's ``l`` is "e.g. cross-entropy"; two readings are offered
(``loss=`` in ``--model c3po``):

- ``choices`` (default): the cross-entropy of example i's gold choice under a
  softmax over its choices' summed log-likelihoods (the quantity lm-eval's
  ``acc`` takes the argmax of);
- ``gold``: the negative log-likelihood of example i's gold continuation (its
  tokens' NLL summed): only the gold answer is scored, so a call costs about
  1 / (number of choices) of ``choices``.
 How the rows' log-likelihoods are computed is a row
scorer's job (:class:`~lm_eval_c3po.score.full_rows.FullRowScorer`, the
reference; :class:`~lm_eval_c3po.score.trie_scorer.TrieScorer`, the fast one);
:func:`choice_loss` picks one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from lm_eval_c3po.routing import RoutingController
from lm_eval_c3po.score.examples import Example, Row
from lm_eval_c3po.score.full_rows import FullRowScorer
from lm_eval_c3po.score.packing import CHUNK_ROWS
from lm_eval_c3po.score.prefix_cache import PrefixCache
from lm_eval_c3po.score.trie_scorer import TrieScorer, fast_path_applies


class RowScorer(Protocol):
    rows: list[Row]

    def __call__(self, omega: Tensor, per: int) -> Tensor:
        """``[per * len(rows)]`` answer log-likelihoods, row r under ``omega[owner * per + g]`` at ``g * R + r``."""


def neighbourhood_loss(losses: Tensor, weights: Tensor) -> Tensor:
    """The NGD / alpha-search objective ``sum_i w_i l_i / sum_i w_i``: ``[..., k]`` -> ``[...]``.

    ``losses`` are the neighbours' gold-answer losses with omega written in,
    ``weights`` their kernel weights; the two broadcast (e.g. losses
    ``[B, G, k]`` of alpha candidates, weights ``[B, 1, k]``). Neighbours with
    weight 0 (padding) contribute nothing, not even a NaN or inf loss, in the
    value or the gradient. Differentiable in ``losses``.
    """
    if losses.shape[-1] != weights.shape[-1]:
        raise ValueError(f"losses {tuple(losses.shape)} and weights {tuple(weights.shape)} must share the neighbour dim")
    total = weights.sum(dim=-1)
    if not bool((total > 0).all()):
        raise ValueError("every row of weights must have a positive sum (a context without neighbours has no loss)")
    safe = torch.where(weights > 0, losses, torch.zeros_like(losses))
    return (weights * safe).sum(dim=-1) / total


OBJECTIVES = ("choices", "gold")


def gold_only(examples: Sequence[Sequence[Example]]) -> list[list[Example]]:
    """The examples with their gold continuation as the only choice (what ``objective="gold"`` scores)."""
    return [[Example(ex.context, [ex.choices[ex.gold]], 0) for ex in items] for items in examples]


class ChoiceLoss:
    """``L(omega)`` for every test context (see the module docstring).

    Called with ``omega [B, *G, L, E]`` (``G`` candidate pathways per context,
    e.g. kernel regression's alpha grid) it returns ``[B, *G]``. With
    ``objective="gold"`` the scorer's examples hold the gold continuation only
    (:func:`gold_only`) and ``l_i`` is its NLL.
    """

    def __init__(self, examples: Sequence[Sequence[Example]], weights: Tensor, scorer: RowScorer,
                 objective: str = "choices"):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown loss objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        self.examples, self.weights, self.scorer, self.objective = examples, weights.float(), scorer, objective

    def __call__(self, omega: Tensor) -> Tensor:
        batch, lead = omega.shape[0], omega.shape[1:-2]
        per = int(np.prod(lead)) if lead else 1
        flat = omega.reshape(batch * per, *omega.shape[-2:])
        ll = self.scorer(flat, per)
        rows = self.scorer.rows
        by_slot: dict[tuple[int, int], list[Tensor]] = {}
        for g in range(per):
            for r, row in enumerate(rows):
                by_slot.setdefault((row.owner * per + g, row.example), []).append(ll[g * len(rows) + r])
        losses = []
        for b in range(batch):
            for g in range(per):
                items = self.examples[b]
                ces = [self._example_loss(torch.stack(by_slot[(b * per + g, i)]), ex.gold)
                       for i, ex in enumerate(items)]
                if not ces:
                    losses.append(flat.new_zeros(()) * flat[b * per + g].sum())
                    continue
                losses.append(neighbourhood_loss(torch.stack(ces), self.weights[b, : len(ces)]))
        return torch.stack(losses).reshape(batch, *lead)

    def _example_loss(self, choice_ll: Tensor, gold: int) -> Tensor:
        if self.objective == "gold":
            return -choice_ll[0]  # the scorer holds the gold continuation alone
        return -torch.log_softmax(choice_ll, 0)[gold]


def choice_loss(model, routing: RoutingController, layer_ids: Sequence[int], tokens: str,
                examples: Sequence[Sequence[Example]], weights: Tensor, max_length: int, *, max_rows: int = CHUNK_ROWS,
                cache: PrefixCache | None = None, cached: bool = True, objective: str = "choices",
                softmax_dtype: torch.dtype | None = None) -> ChoiceLoss:
    """The loss over ``examples`` weighted by ``weights [B, >=n_b]``, on the prefix-cached scorer where the model
    allows it (and ``cached``), else on the reference scorer."""
    scored = gold_only(examples) if objective == "gold" else examples
    if cached and fast_path_applies(model, routing, layer_ids, max_length):
        scorer: RowScorer = TrieScorer(model, routing, layer_ids, tokens, scored, max_length, max_rows, cache,
                                       softmax_dtype)
    else:
        scorer = FullRowScorer(model, routing, layer_ids, tokens, scored, max_length, max_rows, softmax_dtype)
    return ChoiceLoss(examples, weights, scorer, objective)
