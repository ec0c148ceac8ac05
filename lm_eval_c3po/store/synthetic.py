"""Synthetic records and signatures with real shapes, for the store benchmark, tests and demos.

Record i depends only on (seed, i), so any slice of the stream can be
regenerated exactly, which is what a resumed build needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from lm_eval_c3po.store.manifest import StoreManifest
from lm_eval_c3po.store.record import Record
from lm_eval_c3po.store.signature import EmbedderSignature, ModelSignature


def synthetic_manifest(
    num_layers: int = 16,
    num_experts: int = 64,
    top_k: int = 8,
    dim: int = 384,
    model_id: str = "synthetic/moe",
    **build: object,
) -> StoreManifest:
    """A manifest base (settings only) for a made-up softmax-routed MoE and embedder."""
    model = ModelSignature(
        model_id=model_id,
        revision="main",
        config_fingerprint="0" * 16,
        tokenizer_fingerprint="0" * 16,
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        routing_kind="softmax",
        moe_layers=tuple(range(num_layers)),
    )
    return StoreManifest(model=model, embedder=EmbedderSignature("synthetic/embedder", dim), build=dict(build))


def synthetic_record(
    i: int, num_layers: int, num_experts: int, dim: int, seed: int = 0, tasks: Sequence[str] = ("synth_a", "synth_b")
) -> Record:
    """Doc i: softmax routing, a unit-norm random embedding, 2-5 choices, right about 70% of the time."""
    rng = np.random.default_rng([seed, i])
    logits = rng.normal(size=(num_layers, num_experts)).astype(np.float32) * 2
    routing = np.exp(logits - logits.max(axis=1, keepdims=True))
    routing /= routing.sum(axis=1, keepdims=True)
    embedding = rng.normal(size=dim).astype(np.float32)
    embedding /= np.linalg.norm(embedding)
    n_choices = int(rng.integers(2, 6))
    return Record(
        task=tasks[i % len(tasks)],
        doc_id=i,
        question=f"synthetic question {i}?",
        choices=[f"answer {i}.{c}" for c in range(n_choices)],
        context_ids=rng.integers(0, 50_000, size=int(rng.integers(5, 40))),
        choice_ids=[rng.integers(0, 50_000, size=int(rng.integers(1, 7))) for _ in range(n_choices)],
        gold=int(rng.integers(0, n_choices)),
        correct=bool(rng.random() < 0.7),
        correct_norm=bool(rng.random() < 0.7),
        routing=routing,
        embedding=embedding,
    )


def synthetic_records(
    n: int, num_layers: int = 16, num_experts: int = 64, dim: int = 384, seed: int = 0, **kwargs
) -> Iterator[Record]:
    """Docs 0..n-1 in order (see ``synthetic_record``)."""
    for i in range(n):
        yield synthetic_record(i, num_layers, num_experts, dim, seed, **kwargs)
