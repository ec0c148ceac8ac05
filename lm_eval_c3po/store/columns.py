"""The columnar form of a batch of records: what a shard file holds and a store keeps in memory.

Variable-length token ids are stored flat with offsets (CSR style), so every
column is one plain numeric array that safetensors can hold without pickle.
Choices are two-level: ``doc_choice_offsets`` [n+1] index into the choice
list, ``choice_offsets`` [m+1] index into ``choice_ids``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lm_eval_c3po.store.record import Record

TENSOR_DTYPES: dict[str, type] = {
    "routing": np.float32,
    "embeddings": np.float32,
    "context_ids": np.int64,
    "context_offsets": np.int64,
    "choice_ids": np.int64,
    "choice_offsets": np.int64,
    "doc_choice_offsets": np.int64,
    "gold": np.int64,
    "correct": np.bool_,
    "correct_norm": np.bool_,
}

# Stored embeddings must be unit-norm (inner product == cosine); float32 rounding stays far below this.
NORM_TOLERANCE = 1e-3


def routing_shape(n: int, num_layers: int, num_experts: int, slots: int | None) -> tuple[int, ...]:
    """``[n, L, E]`` for a last-token store, ``[n, P, L, E]`` for one built for ``P`` token slots."""
    return (n, num_layers, num_experts) if slots is None else (n, slots, num_layers, num_experts)


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


@dataclass
class Columns:
    """Column arrays for n records plus their texts (dicts: id, task, doc_id, question, choices)."""

    routing: np.ndarray
    embeddings: np.ndarray
    context_ids: np.ndarray
    context_offsets: np.ndarray
    choice_ids: np.ndarray
    choice_offsets: np.ndarray
    doc_choice_offsets: np.ndarray
    gold: np.ndarray
    correct: np.ndarray
    correct_norm: np.ndarray
    texts: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.gold)

    @classmethod
    def from_records(cls, records: Sequence[Record], num_layers: int, num_experts: int, dim: int,
                     slots: int | None = None) -> Columns:
        """Columns of ``records`` in order; the shapes are needed for a shard that kept no record.

        ``slots``: the token slots per record of a store built for several (routing ``[n, P, L, E]``);
        None for the default last-token store (``[n, L, E]``).
        """
        choices = [c for r in records for c in r.choice_ids]

        def stack(arrays: list[np.ndarray], empty_shape: tuple[int, ...], dtype: type) -> np.ndarray:
            return np.stack(arrays).astype(dtype, copy=False) if arrays else np.zeros(empty_shape, dtype)

        return cls(
            routing=stack([r.routing for r in records], routing_shape(0, num_layers, num_experts, slots), np.float32),
            embeddings=stack([r.embedding for r in records], (0, dim), np.float32),
            context_ids=np.concatenate([r.context_ids for r in records]) if records else np.zeros(0, np.int64),
            context_offsets=_offsets([len(r.context_ids) for r in records]),
            choice_ids=np.concatenate(choices) if choices else np.zeros(0, np.int64),
            choice_offsets=_offsets([len(c) for c in choices]),
            doc_choice_offsets=_offsets([len(r.choice_ids) for r in records]),
            gold=np.array([r.gold for r in records], dtype=np.int64),
            correct=np.array([r.correct for r in records], dtype=np.bool_),
            correct_norm=np.array([r.correct_norm for r in records], dtype=np.bool_),
            texts=[
                {"id": r.id, "task": r.task, "doc_id": r.doc_id, "question": r.question, "choices": list(r.choices)}
                for r in records
            ],
        )

    def tensors(self) -> dict[str, np.ndarray]:
        """The numeric columns, contiguous and in their storage dtypes (for safetensors)."""
        return {name: np.ascontiguousarray(getattr(self, name), dtype=dt) for name, dt in TENSOR_DTYPES.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], texts: list[dict[str, Any]]) -> Columns:
        missing = sorted(set(TENSOR_DTYPES) - set(tensors))
        if missing:
            raise ValueError(f"missing tensors {missing}")
        return cls(**{name: tensors[name] for name in TENSOR_DTYPES}, texts=texts)

    def context(self, i: int) -> np.ndarray:
        return self.context_ids[self.context_offsets[i] : self.context_offsets[i + 1]]

    def choices(self, i: int) -> list[np.ndarray]:
        lo, hi = self.doc_choice_offsets[i], self.doc_choice_offsets[i + 1]
        return [self.choice_ids[self.choice_offsets[j] : self.choice_offsets[j + 1]] for j in range(lo, hi)]

    def record(self, i: int) -> Record:
        t = self.texts[i]
        return Record(
            task=t["task"],
            doc_id=t["doc_id"],
            question=t["question"],
            choices=t["choices"],
            context_ids=self.context(i),
            choice_ids=self.choices(i),
            gold=int(self.gold[i]),
            correct=bool(self.correct[i]),
            correct_norm=bool(self.correct_norm[i]),
            routing=self.routing[i],
            embedding=self.embeddings[i],
        )

    def slice(self, start: int, stop: int) -> Columns:
        """Rows [start, stop) with offsets rebased to 0 (what one shard of a saved store holds)."""
        c0, c1 = self.context_offsets[start], self.context_offsets[stop]
        d0, d1 = self.doc_choice_offsets[start], self.doc_choice_offsets[stop]
        t0, t1 = self.choice_offsets[d0], self.choice_offsets[d1]
        return Columns(
            routing=self.routing[start:stop],
            embeddings=self.embeddings[start:stop],
            context_ids=self.context_ids[c0:c1],
            context_offsets=self.context_offsets[start : stop + 1] - c0,
            choice_ids=self.choice_ids[t0:t1],
            choice_offsets=self.choice_offsets[d0 : d1 + 1] - t0,
            doc_choice_offsets=self.doc_choice_offsets[start : stop + 1] - d0,
            gold=self.gold[start:stop],
            correct=self.correct[start:stop],
            correct_norm=self.correct_norm[start:stop],
            texts=self.texts[start:stop],
        )

    @classmethod
    def concat(cls, parts: Iterable[Columns], rows: int | None = None) -> Columns:
        """Rows of ``parts`` in order, offsets rebased; always new arrays, never views of the parts.

        ``parts`` may be a generator (a store loading shard by shard): with
        ``rows`` given, routing and embeddings are copied into preallocated
        arrays as each part arrives, so only one part's big columns are alive
        at a time and load memory stays near the final size.
        """
        if rows is None:
            parts = list(parts)
            rows = sum(len(p) for p in parts)
        routing = embeddings = None
        small: list[Columns] = []
        at = 0
        for p in parts:
            if routing is None:
                routing = np.empty((rows, *p.routing.shape[1:]), np.float32)
                embeddings = np.empty((rows, *p.embeddings.shape[1:]), np.float32)
            n = len(p)
            if at + n > rows:
                raise ValueError(f"parts hold more than the {rows} rows expected")
            routing[at : at + n], embeddings[at : at + n] = p.routing, p.embeddings
            small.append(replace(p, routing=np.empty(0, np.float32), embeddings=np.empty(0, np.float32)))  # drop refs
            at += n
        if routing is None or at != rows:
            raise ValueError(f"parts hold {at} rows, expected {rows}")

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in small])

        def cat_offsets(name: str) -> np.ndarray:
            pieces, base = [np.zeros(1, np.int64)], 0
            for p in small:
                off = getattr(p, name)
                pieces.append(off[1:] + base)
                base += int(off[-1])
            return np.concatenate(pieces)

        return cls(
            routing=routing,
            embeddings=embeddings,
            context_ids=cat("context_ids"),
            context_offsets=cat_offsets("context_offsets"),
            choice_ids=cat("choice_ids"),
            choice_offsets=cat_offsets("choice_offsets"),
            doc_choice_offsets=cat_offsets("doc_choice_offsets"),
            gold=cat("gold"),
            correct=cat("correct"),
            correct_norm=cat("correct_norm"),
            texts=[t for p in small for t in p.texts],
        )

    def validate(self, num_layers: int, num_experts: int, dim: int, slots: int | None = None) -> None:
        """Raise ValueError naming the first inconsistency: shapes, offsets, dtypes, non-finite values."""
        n = len(self.gold)
        shapes = {
            "routing": routing_shape(n, num_layers, num_experts, slots),
            "embeddings": (n, dim),
            "correct": (n,),
            "correct_norm": (n,),
            "context_offsets": (n + 1,),
            "doc_choice_offsets": (n + 1,),
        }
        for name, shape in shapes.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(
                    f"{name} has shape {got}, expected {shape} (n={n}, L={num_layers}, E={num_experts}, D={dim})"
                )
        for name, dt in TENSOR_DTYPES.items():
            if getattr(self, name).dtype != dt:
                raise ValueError(f"{name} has dtype {getattr(self, name).dtype}, expected {np.dtype(dt)}")
        m = int(self.doc_choice_offsets[-1])
        for name, off, total in (
            ("context_offsets", self.context_offsets, len(self.context_ids)),
            ("doc_choice_offsets", self.doc_choice_offsets, len(self.choice_offsets) - 1),
            ("choice_offsets", self.choice_offsets, len(self.choice_ids)),
        ):
            if len(off) == 0 or off[0] != 0 or off[-1] != total or np.any(np.diff(off) < 0):
                raise ValueError(f"{name} are not non-decreasing offsets from 0 to {total}")
        if len(self.choice_offsets) != m + 1:
            raise ValueError(f"choice_offsets has {len(self.choice_offsets)} entries, expected {m + 1}")
        counts = np.diff(self.doc_choice_offsets)
        if np.any(self.gold < 0) or np.any(self.gold >= counts):
            row = int(np.flatnonzero((self.gold < 0) | (self.gold >= counts))[0])
            raise ValueError(f"row {row}: gold index {self.gold[row]} is outside its {counts[row]} choices")
        if len(self.texts) != n:
            raise ValueError(f"{len(self.texts)} text rows for {n} tensor rows")
        for row, (t, c) in enumerate(zip(self.texts, counts)):
            if len(t["choices"]) != c:
                raise ValueError(f"row {row} ({t['id']}): {len(t['choices'])} choice strings but {c} choice id arrays")
        for name in ("routing", "embeddings"):
            values = getattr(self, name)
            bad = ~np.isfinite(values).all(axis=tuple(range(1, values.ndim)))  # works for 0-row shards too
            if bad.any():
                rows = np.flatnonzero(bad)
                first = f"row {rows[0]}, {self.texts[rows[0]]['id']}"
                raise ValueError(f"{name} has NaN/inf in {len(rows)} rows (first: {first})")
        norms = np.linalg.norm(self.embeddings, axis=1)
        bad = np.abs(norms - 1) > NORM_TOLERANCE
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"embeddings must be unit-norm; row {row} has norm {norms[row]:.4f}")
