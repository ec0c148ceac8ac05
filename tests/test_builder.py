"""`c3po build-reference`: agrees with lm-eval's own acc, stores the true pathways, and refuses empty
results and bad names with clear messages. Kills and resumes: test_builder_faults.py; several
processes: test_builder_distributed.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_eval_c3po.cli import main as c3po
from lm_eval_c3po.store import ReferenceStore
from lm_eval_c3po.testing import write_mc_task

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "tests" / "fixtures" / "task_configs_local"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
WINOGRANDE = "c3po_winogrande"


def build_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["build-reference", "--model", str(model), "--model_args", "dtype=float32", "--device", "cpu",
            "--batch_size", "4", "--include_path", str(LOCAL), "--out", str(out), *extra]


def arc_argv(model: Path, out: Path) -> list[str]:
    return build_argv(model, out, "--preset", "arc", "--shard_size", "2")


def tree_digest(directory: Path) -> dict[str, str]:
    """SHA-256 of every file of a store (the lock file aside), keyed by relative path."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def arc_store(tiny_model_dir, tmp_path_factory) -> Path:
    """The arc preset (OpenBookQA + SciQ fixtures), default keep: one uninterrupted build."""
    out = tmp_path_factory.mktemp("arc") / "store"
    assert c3po(arc_argv(tiny_model_dir, out)) == 0
    return out


@pytest.fixture(scope="module")
def all_docs(tiny_model_dir, tmp_path_factory) -> Path:
    """The arc preset plus WinoGrande (partial scoring: one context per choice) with --keep all."""
    out = tmp_path_factory.mktemp("all_docs") / "store"
    assert c3po(build_argv(tiny_model_dir, out, "--tasks", f"c3po_ref_arc,{WINOGRANDE}", "--keep", "all")) == 0
    return out


@pytest.fixture(scope="module")
def lm_eval_samples(tiny_model_dir, tmp_path_factory) -> dict[str, dict]:
    """lm-eval's own per-doc requests and metrics for `--model hf` on the same tasks, via the real CLI."""
    out = tmp_path_factory.mktemp("lm_eval_out")
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_model_dir},dtype=float32",
         "--tasks", f"c3po_ref_arc,{WINOGRANDE}", "--include_path", str(LOCAL), "--device", "cpu", "--batch_size", "4",
         "--log_samples", "--output_path", str(out)],
        cwd=out, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            samples[f"{task}/{sample['doc_id']}"] = sample
    assert len(samples) == 18
    return samples


def test_every_doc_is_scored_and_rendered_as_lm_eval_does(all_docs, lm_eval_samples):
    """Per doc: lm-eval's acc / acc_norm, and its requests: the question is the gold request's
    context (for WinoGrande, whose contexts differ per choice, the gold one), the choices the
    continuations."""
    store = ReferenceStore.load(all_docs)
    assert sorted(store.ids) == sorted(lm_eval_samples)
    for i, text in enumerate(store.texts):
        sample = lm_eval_samples[text["id"]]
        assert store.correct[i] == bool(sample["acc"]), text["id"]
        if "acc_norm" in sample:
            assert store.correct_norm[i] == bool(sample["acc_norm"]), text["id"]
        requests = [sample["arguments"][f"gen_args_{j}"] for j in range(len(sample["arguments"]))]
        assert text["choices"] == [r["arg_1"] for r in requests]
        assert text["question"] == requests[store.gold[i]]["arg_0"]
    contexts = {r["arg_0"] for r in lm_eval_samples[f"{WINOGRANDE}/0"]["arguments"].values()}
    assert len(contexts) == 2  # the partial-scoring path really was exercised


def test_kept_docs_are_exactly_lm_evals_correct_docs(arc_store, lm_eval_samples):
    arc = {rid: s for rid, s in lm_eval_samples.items() if not rid.startswith(WINOGRANDE)}
    right = sorted(rid for rid, s in arc.items() if s["acc"] == 1.0)
    assert 0 < len(right) < len(arc)  # meaningful only if the model is right on some docs and wrong on others
    kept = ReferenceStore.load(arc_store)
    assert sorted(kept.ids) == right and kept.correct.all()
    for task in ("c3po_ref_openbookqa", "c3po_ref_sciq"):
        counts, samples = kept.sources[task], [s for rid, s in arc.items() if rid.startswith(task + "/")]
        assert counts.seen == 6 and counts.kept == counts.correct == sum(s["acc"] for s in samples)
        assert counts.correct_norm == sum(s["acc_norm"] for s in samples)


def test_rows_hold_the_context_pathway_tokens_and_embedding(all_docs, tiny_model_dir):
    """The stored routing is what the routing controller captures for the context run alone."""
    from lm_eval_c3po.retrieve import Embedder
    from lm_eval_c3po.lm_eval_model import C3POLM
    from lm_eval_c3po.routing import token_positions

    lm = C3POLM(pretrained=str(tiny_model_dir), method="base", device="cpu", dtype="float32", batch_size=4)
    store = ReferenceStore.load(all_docs)
    questions = [t["question"] for t in store.texts]
    np.testing.assert_allclose(store.embeddings, Embedder(device="cpu").encode(questions), atol=1e-5)
    for i, text in enumerate(store.texts):
        context, gold = store.context_ids(i), store.gold[i]
        expected_context, expected_gold = lm._encode_pair(text["question"], text["choices"][gold])
        assert context.tolist() == expected_context and store.choice_ids(i)[gold].tolist() == expected_gold
        with torch.no_grad(), lm.routing.capture(token_positions("last", [len(context)])) as cap:
            lm.model(torch.tensor([context.tolist()]))
        np.testing.assert_allclose(store.routing[i], cap.routing[0, 0].numpy(), atol=1e-6, rtol=0)


# Every doc offers its gold answer twice and the gold is the second copy: equal log-likelihoods, and
# argmax (lm-eval's and ours) takes the first, so no model can be right on any of them.
UNWINNABLE = [{"question": q, "choices": [c[a], c[a]], "answer": 1} for q, c, a in [
    ("What is the capital of France?", ["Paris", "London"], 0),
    ("Which animal is a mammal?", ["trout", "whale"], 1),
    ("Where does the sun rise?", ["west", "east"], 1),
]]


def test_empty_result_is_an_error_and_leaves_an_existing_store_alone(arc_store, tiny_model_dir, tmp_path, capsys):
    write_mc_task(tmp_path, "unwinnable", UNWINNABLE)
    fresh = tmp_path / "fresh"
    argv = build_argv(tiny_model_dir, fresh, "--tasks", "unwinnable", "--include_path", str(tmp_path))
    assert c3po(argv) == 1
    err = capsys.readouterr().err
    assert "nothing was kept" in err and "0 of 3 docs" in err and "unwinnable: 0/3 right" in err
    assert not fresh.exists()

    before = tree_digest(arc_store)
    argv = build_argv(tiny_model_dir, arc_store, "--tasks", "unwinnable", "--include_path", str(tmp_path))
    assert c3po([*argv, "--overwrite"]) == 1
    assert "No store was written" in capsys.readouterr().err
    assert tree_digest(arc_store) == before
    assert sorted(p.name for p in arc_store.parent.iterdir()) == ["store"]  # no partial build left behind


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--preset", "gsm8k"], "unknown preset 'gsm8k'; choose one of: arc, hellaswag, mmlu, piqa, winogrande"),
        (["--tasks", " , "], "no tasks given"),
        (["--preset", "arc", "--model_args", "pretrained=other"], "must not set 'pretrained': give it as --model"),
        (["--preset", "arc", "--include_path", "/no/such/dir"], "--include_path /no/such/dir is not a directory"),
        (["--preset", "arc", "--shard_size", "0"], "--shard_size must be >= 1, got 0"),
        (["--tasks", "c3po_ref_arcc"], "unknown task or group 'c3po_ref_arcc' (did you mean c3po_ref_arc"),
    ],
    ids=["preset", "empty-tasks", "model-args", "include-path", "shard-size", "task-typo"],
)
def test_bad_names_give_clear_errors(extra, message, tiny_model_dir, tmp_path, capsys):
    assert c3po(build_argv(tiny_model_dir, tmp_path / "out", *extra)) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help():
    c3po_script = Path(sys.executable).with_name("c3po")
    proc = subprocess.run([str(c3po_script), "build-reference", "--help"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    for option in ("--model", "--preset", "--tasks", "--keep", "--out", "--shard_size", "arc -> c3po_ref_arc"):
        assert option in proc.stdout
