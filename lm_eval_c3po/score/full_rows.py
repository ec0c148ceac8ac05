"""The reference row scorer: every row through the whole model, with omega written at its context tokens.

A pathway has one row per (token slot, critical layer), slot-major: ``omega [P * L_crit, E]`` with ``P``
the slots of the token spec (:func:`~lm_eval_c3po.routing.token_slots`); slot p is written at its own
position.

Simple enough to trust: the prefix-cached :class:`~lm_eval_c3po.score.trie_scorer.TrieScorer`
is tested against it, and families off that path (GraniteMoE, PhiMoE, flash
attention) use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm_eval_c3po.routing import RoutingController, input_device, token_positions
from lm_eval_c3po.score.examples import Example, answer_log_probs, layout_rows
from lm_eval_c3po.score.packing import CHUNK_ROWS


class FullRowScorer:
    """Row log-likelihoods of ``examples``' choices, ``max_rows`` padded rows per forward call."""

    def __init__(self, model, routing: RoutingController, layer_ids: Sequence[int], tokens: str,
                 examples: Sequence[Sequence[Example]], max_length: int, max_rows: int = CHUNK_ROWS,
                 softmax_dtype: torch.dtype | None = None):
        self.model, self.routing, self.layer_ids, self.tokens = model, routing, list(layer_ids), tokens
        self.examples, self.max_rows, self.softmax_dtype = examples, max_rows, softmax_dtype
        self.rows = layout_rows(examples, max_length)
        self.device = input_device(model)

    def __call__(self, omega: torch.Tensor, per: int) -> torch.Tensor:
        """``[per * rows]``: row r's answer log-likelihood under pathway ``omega[b * per + g]`` at ``g * rows + r``."""
        jobs = [(g, row) for g in range(per) for row in self.rows]
        parts = [self._forward(omega, jobs[start:start + self.max_rows], per)
                 for start in range(0, len(jobs), self.max_rows)]
        return torch.cat(parts) if parts else omega.new_zeros(0)

    def _forward(self, omega: torch.Tensor, jobs, per: int) -> torch.Tensor:
        width = max(len(row.tokens) for _, row in jobs)
        ids = torch.zeros(len(jobs), width, dtype=torch.long)
        for n, (_, row) in enumerate(jobs):
            ids[n, : len(row.tokens)] = torch.tensor(row.tokens)
        positions = token_positions(self.tokens, [row.context_len for _, row in jobs])
        owner = torch.tensor([row.owner * per + g for g, row in jobs])
        written = omega[owner].view(len(jobs), positions.shape[1], len(self.layer_ids), omega.shape[-1])
        with self.routing.override(positions, written, layers=self.layer_ids):
            logits = self.model(ids.to(self.device)).logits
        out = []
        for n, (_, row) in enumerate(jobs):
            end = len(row.tokens)
            answer = self.examples[row.owner][row.example].choices[row.choice]
            targets = torch.tensor(list(answer), device=logits.device)
            out.append(answer_log_probs(logits[n, end - row.answer_len:end], targets, self.softmax_dtype).sum())
        return torch.stack(out).float()
