"""Routing hooks around the padded batches lm-eval builds itself.

HFLM hands ``_model_call`` a right-padded tensor and ``_model_generate`` a
left-padded one; neither says which request a row belongs to. A
:class:`RowPlan` recognises each row by its exact tokens (lm-eval's
:func:`~lm_eval_c3po.score.examples.causal_row`), and the two hooks use it:
:class:`PathwayOverride` writes each context's pathway at that row's context
positions, :class:`RoutingRecorder` reads the routing at each row's last
context token (the reference builder's capture pass).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lm_eval_c3po.routing import RoutingController, token_positions
from lm_eval_c3po.score.examples import causal_row

# lm-eval's tokenized loglikelihood request: (cache key, context ids, continuation ids).
Request = tuple[tuple[str, str] | None, list[int], list[int]]
Key = tuple[int, ...]


@dataclass(frozen=True)
class Slot:
    """Where one context sits inside one model input."""

    context: Key
    context_len: int  # context tokens left in the input after lm-eval's left truncation


class RowPlan:
    """Maps the rows of lm-eval's right-padded batches back to their requests."""

    def __init__(self, requests: Sequence[Request], max_length: int):
        self._slots: dict[Key, Slot] = {}
        for _, context, continuation in requests:
            tokens, context_len = causal_row(context, continuation, max_length)
            self._slots[tuple(tokens)] = Slot(tuple(context), context_len)
        self._lengths = sorted({len(k) for k in self._slots}, reverse=True)

    def match(self, row: list[int]) -> Slot | None:
        """The slot whose input is ``row`` minus its right padding (longest match wins)."""
        last = len(row)
        while last > 0 and row[last - 1] == 0:
            last -= 1
        for length in self._lengths:
            if length < last:
                break
            if length <= len(row) and (slot := self._slots.get(tuple(row[:length]))) is not None:
                return slot
        return None

    def positions(self, inps: torch.Tensor, tokens: str) -> tuple[list[Slot | None], torch.Tensor]:
        """Each row's slot and its context positions ``[B, P]`` for ``tokens`` (-1 for rows of no request)."""
        slots = [self.match(row) for row in inps.tolist()]
        positions = token_positions(tokens, [slot.context_len if slot else 1 for slot in slots])
        positions[torch.tensor([slot is None or slot.context_len < 1 for slot in slots])] = -1
        return slots, positions


class PathwayOverride:
    """Write each context's pathway (keyed by its token ids) at its context positions.

    A pathway is ``[1, P * L_crit, E]`` with slot-major rows, as the re-mixers return it
    (:func:`~lm_eval_c3po.routing.own_pathways`); a pathway of one slot (``[1, L_crit, E]``) is written at
    every slot.
    """

    def __init__(self, routing: RoutingController, pathways: Mapping[Key, torch.Tensor], layers: Sequence[int],
                 tokens: str, plan: RowPlan | None = None):
        self.routing, self.pathways, self.layers, self.tokens, self.plan = routing, pathways, layers, tokens, plan

    @contextmanager
    def around_call(self, inps: torch.Tensor) -> Iterator[None]:
        if self.plan is None or not self.pathways:
            yield
            return
        slots, positions = self.plan.positions(inps, self.tokens)
        omega = self._batch([slot.context if slot else None for slot in slots], positions.shape[1])
        with self.routing.override(positions, omega, layers=self.layers):
            yield

    @contextmanager
    def around_generate(self, context: torch.Tensor, attention_mask: torch.Tensor | None) -> Iterator[None]:
        """The prefill of lm-eval's left-padded prompts (a prompt of n tokens fills the last n positions)."""
        rows = context.tolist() if attention_mask is None else [
            [t for t, m in zip(row, mrow) if m] for row, mrow in zip(context.tolist(), attention_mask.tolist())
        ]
        known = [tuple(r) in self.pathways for r in rows]
        if not any(known):
            yield
            return
        lengths = torch.tensor([max(len(r), 1) for r in rows])
        positions = token_positions(self.tokens, lengths) + (context.shape[1] - lengths).unsqueeze(1)
        positions[~torch.tensor(known)] = -1
        omega = self._batch([tuple(r) for r in rows], positions.shape[1])
        with self.routing.override(positions, omega, layers=self.layers, first_pass_only=True):
            yield

    def _batch(self, keys: Sequence[Key | None], num_positions: int) -> torch.Tensor:
        """omega ``[B, P, L_crit, E]``; rows without a pathway get any one as a placeholder (their positions are -1)."""
        placeholder = next(iter(self.pathways.values()))
        omega = torch.stack([self.pathways.get(key, placeholder) for key in keys])
        omega = omega.reshape(len(keys), -1, len(self.layers), omega.shape[-1])  # unfold the slot-major rows
        return omega.expand(-1, num_positions, -1, -1) if omega.shape[1] == 1 else omega


class RoutingRecorder:
    """Record the routing (every MoE layer) at each request's context token slots, once per context:
    ``[L, E]`` for ``tokens="last"``, else ``[P, L, E]`` in :func:`~lm_eval_c3po.routing.token_slots` order."""

    def __init__(self, routing: RoutingController, plan: RowPlan, tokens: str = "last"):
        self.routing, self.plan, self.tokens = routing, plan, tokens
        self.captured: dict[Key, torch.Tensor] = {}

    @contextmanager
    def around_call(self, inps: torch.Tensor) -> Iterator[None]:
        slots, positions = self.plan.positions(inps, self.tokens)
        with self.routing.capture(positions) as cap:
            yield
        for slot, routing in zip(slots, cap.routing):
            if slot is not None:
                self.captured.setdefault(slot.context, routing[0] if self.tokens == "last" else routing)
