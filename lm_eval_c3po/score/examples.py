"""Multiple-choice items as token ids and the causal rows lm-eval builds from them.

lm-eval scores a (context, continuation) pair on the row
``(context + continuation)[-(max_length + 1):][:-1]``: left-truncated to the
model's window, the last answer token only a target. Everything that scores
rows here (the reference loss, the prefix-cached scorer, the batch hooks that
find lm-eval's rows again) builds them with :func:`causal_row` and turns
logits into log-likelihoods with :func:`answer_log_probs`, so they agree with
lm-eval token for token and in its precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class Example:
    """A multiple-choice item as token ids: context, one continuation per choice, gold index."""

    context: Sequence[int]
    choices: Sequence[Sequence[int]]
    gold: int


class Row(NamedTuple):
    """One (context b, example i, choice c) input row in lm-eval's causal layout."""

    owner: int  # b: the test context whose loss this row belongs to
    example: int  # i: the example among that context's examples (its neighbours)
    choice: int  # c
    tokens: list[int]  # the model input: context then all but the last answer token, truncated
    context_len: int  # context tokens left in ``tokens`` after truncation
    answer_len: int

    @property
    def key(self) -> tuple[int, int, int]:
        return self.owner, self.example, self.choice


def causal_row(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[list[int], int]:
    """lm-eval's model input for one pair and the number of context tokens it keeps."""
    tokens = (list(context) + list(continuation))[-(max_length + 1):][:-1]
    return tokens, len(tokens) - len(continuation) + 1


def layout_rows(examples: Sequence[Sequence[Example]], max_length: int) -> list[Row]:
    """Every choice of every example of every context, in (context, example, choice) order."""
    rows = []
    for b, items in enumerate(examples):
        for i, example in enumerate(items):
            for c, continuation in enumerate(example.choices):
                tokens, context_len = causal_row(example.context, continuation, max_length)
                rows.append(Row(b, i, c, tokens, context_len, len(continuation)))
    return rows


def answer_log_probs(logits: torch.Tensor, targets: torch.Tensor, softmax_dtype: torch.dtype | None) -> torch.Tensor:
    """Each target token's log-probability as HFLM computes it: ``log_softmax`` in ``softmax_dtype``
    (HFLM's model arg), else in the logits' own dtype (bf16 logits give bf16 log-probabilities)."""
    logprobs = torch.log_softmax(logits, dim=-1, dtype=softmax_dtype)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
