"""Store format: write/load round trip of every field, keep policies, fingerprints, signatures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lm_eval_c3po.store import ModelSignature, ReferenceStore, StoreWriter, config_fingerprint, tokenizer_fingerprint
from lm_eval_c3po.store.synthetic import synthetic_manifest, synthetic_record

L, E, D = 4, 8, 16


def records(n, start=0):
    out = [synthetic_record(i, L, E, D) for i in range(start, start + n)]
    # Texts that break naive JSONL handling: a newline, a Unicode line separator, quotes, a string doc id.
    out[0].question = 'line one\nline two \u2028 "quoted" \u00e9'
    out[1].doc_id = "doc-b"
    return out


def assert_same_record(a, b):
    for name in ("id", "task", "doc_id", "question"):
        assert getattr(a, name) == getattr(b, name)
    assert list(a.choices) == list(b.choices)
    assert (a.gold, a.correct, a.correct_norm) == (b.gold, b.correct, b.correct_norm)
    np.testing.assert_array_equal(a.context_ids, b.context_ids)
    assert len(a.choice_ids) == len(b.choice_ids)
    for x, y in zip(a.choice_ids, b.choice_ids):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.routing, b.routing)
    np.testing.assert_array_equal(a.embedding, b.embedding)


def test_round_trip_every_field(tmp_path):
    recs = records(37)
    manifest = synthetic_manifest(L, E, 2, D, limit=37, seed=1234)
    with StoreWriter(tmp_path / "s", manifest, shard_size=10, keep="all") as writer:
        for r in recs:
            assert writer.add(r)
    store = ReferenceStore.load(tmp_path / "s", expect=manifest.model, embedder=manifest.embedder)

    assert len(store) == 37
    for i, r in enumerate(recs):
        assert_same_record(store.record(i), r)
        np.testing.assert_array_equal(store.context_ids(i), r.context_ids)
        assert store.texts[i]["id"] == r.id and store.row(r.id) == i
    assert store.routing.shape == (37, L, E) and store.routing.dtype == np.float32
    assert store.embeddings.shape == (37, D) and store.gold.dtype == np.int64
    np.testing.assert_array_equal(store.routing[np.array([[3, 1]])], np.stack([recs[3].routing, recs[1].routing])[None])
    assert store.manifest.build == {"limit": 37, "seed": 1234, "keep": "all", "shard_size": 10}
    assert [s.rows for s in store.manifest.shards] == [10, 10, 10, 7]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["manifest.json", "shards"]
    on_disk = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert on_disk["model"]["num_layers"] == L and on_disk["embedder"] == {"name": "synthetic/embedder", "dim": D}


def test_keep_policy_and_source_counts(tmp_path):
    recs = records(40)
    with StoreWriter(tmp_path / "s", synthetic_manifest(L, E, 2, D), shard_size=16, keep="acc") as writer:
        kept = [writer.add(r) for r in recs]
    store = ReferenceStore.load(tmp_path / "s")
    assert kept == [r.correct for r in recs]
    assert store.ids == [r.id for r in recs if r.correct] and store.correct.all()
    for task in ("synth_a", "synth_b"):
        mine = [r for r in recs if r.task == task]
        c = store.sources[task]
        assert (c.seen, c.kept, c.correct, c.correct_norm) == (
            len(mine),
            sum(r.correct for r in mine),
            sum(r.correct for r in mine),
            sum(r.correct_norm for r in mine),
        )
        assert c.accuracy == pytest.approx(c.correct / c.seen)


def test_config_fingerprint_ignores_volatile_fields():
    base = {"model_type": "olmoe", "num_experts": 64, "num_experts_per_tok": 8, "rope_parameters": {"theta": 1e4}}
    noisy = {
        **base,
        "_name_or_path": "/somewhere/else",
        "transformers_version": "5.9.0",
        "torch_dtype": "bfloat16",
        "dtype": "float32",
        "_attn_implementation": "sdpa",
        "use_cache": False,
    }

    class Config:
        def to_dict(self):
            return dict(reversed(list(noisy.items())))

    fp = config_fingerprint(base)
    assert fp == config_fingerprint(noisy) == config_fingerprint(Config())
    assert len(fp) == 16
    assert fp != config_fingerprint({**base, "num_experts": 60})
    assert fp != config_fingerprint({**base, "rope_parameters": {"theta": 5e5}})


class FakeTokenizer:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, None

    def __init__(self, vocab, add_bos=True):
        self.vocab, self.add_bos = vocab, add_bos

    def get_vocab(self):
        return dict(self.vocab)

    def encode(self, text):
        ids = [self.vocab.get(w, 0) for w in text.split()]
        return [self.bos_token_id, *ids] if self.add_bos else ids


def test_tokenizer_fingerprint_covers_vocab_and_special_token_handling():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "The": 3, "quick": 4}

    class SlowFakeTokenizer(FakeTokenizer):  # another class name, same behaviour
        pass

    fp = tokenizer_fingerprint(FakeTokenizer(vocab))
    assert fp == tokenizer_fingerprint(SlowFakeTokenizer(dict(reversed(vocab.items()))))
    assert fp != tokenizer_fingerprint(FakeTokenizer({**vocab, "fox": 5}))
    assert fp != tokenizer_fingerprint(FakeTokenizer(vocab, add_bos=False))


def test_model_signature_checks_its_own_fields():
    kwargs = dict(
        model_id="m", revision="main", config_fingerprint="c", tokenizer_fingerprint="t",
        num_layers=2, num_experts=8, top_k=2, routing_kind="softmax", moe_layers=[0, 1],
    )  # fmt: skip
    sig = ModelSignature(**kwargs)
    assert ModelSignature.from_dict(sig.to_dict()) == sig and sig.moe_layers == (0, 1)
    with pytest.raises(ValueError, match="routing_kind"):
        ModelSignature(**{**kwargs, "routing_kind": "relu"})
    with pytest.raises(ValueError, match="moe_layers"):
        ModelSignature(**{**kwargs, "moe_layers": [0]})
    with pytest.raises(ValueError, match="top_k"):
        ModelSignature(**{**kwargs, "top_k": 9})
