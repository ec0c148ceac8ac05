"""One reference doc as the builder hands it to the writer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(eq=False)
class Record:
    """One lm-eval doc after the model's forward pass.

    ``routing`` is the pathway: the router scores of the last context token in
    every MoE layer, float32 [L, E]; or, in a store built for other token slots
    (``--tokens``), those scores at each slot, [P, L, E]. ``embedding`` is the unit-norm sentence
    embedding of ``question`` (the lm-eval context), float32 [D].
    ``context_ids`` are the context's token ids, ``choice_ids`` one array of
    continuation token ids per choice. ``correct`` / ``correct_norm`` say
    whether the model's argmax log-likelihood (plain / length-normalised, as
    lm-eval scores ``acc`` / ``acc_norm``) picked ``gold``.
    """

    task: str
    doc_id: int | str
    question: str
    choices: Sequence[str]
    context_ids: np.ndarray
    choice_ids: Sequence[np.ndarray]
    gold: int
    correct: bool
    correct_norm: bool
    routing: np.ndarray
    embedding: np.ndarray

    def __post_init__(self) -> None:
        self.choices = [str(c) for c in self.choices]
        self.context_ids = np.asarray(self.context_ids, dtype=np.int64).reshape(-1)
        self.choice_ids = [np.asarray(c, dtype=np.int64).reshape(-1) for c in self.choice_ids]
        self.routing = np.asarray(self.routing, dtype=np.float32)
        self.embedding = np.asarray(self.embedding, dtype=np.float32).reshape(-1)
        self.gold, self.correct, self.correct_norm = int(self.gold), bool(self.correct), bool(self.correct_norm)
        if len(self.choices) != len(self.choice_ids):
            raise ValueError(
                f"{self.id}: {len(self.choices)} choice strings but {len(self.choice_ids)} choice id arrays"
            )
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"{self.id}: gold index {self.gold} is outside its {len(self.choices)} choices")
        if self.routing.ndim not in (2, 3):
            raise ValueError(
                f"{self.id}: routing must be [layers, experts] or [slots, layers, experts], got shape "
                f"{self.routing.shape}"
            )

    @property
    def id(self) -> str:
        """Store-wide unique id, ``"<task>/<doc_id>"``; what ``StoreWriter.done_ids`` returns."""
        return f"{self.task}/{self.doc_id}"
