"""Each benchmark retrieves from its own store in one run (``reference=TASK=DIR+...`` or a mapping file)."""

from __future__ import annotations

import json

import pytest

from lm_eval_c3po.remix import C3POConfig, C3POConfigError
from lm_eval_c3po.testing import write_mc_task

OTHER_DOCS = [
    {"question": "Which number comes after one?", "choices": ["two", "nine", "five"], "answer": 0},
    {"question": "Which letter comes after A?", "choices": ["D", "B", "C"], "answer": 1},
    {"question": "Is water wet?", "choices": ["no", "yes"], "answer": 1},
    {"question": "Which is a number?", "choices": ["fox", "dog", "seven"], "answer": 2},
]


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tiny_task_dir, tmp_path_factory):
    """Tasks tiny_mc and tiny_other, a group of both, and one --keep all store per task."""
    from lm_eval_c3po.cli import main

    root = tmp_path_factory.mktemp("pair")
    tasks = write_mc_task(root / "tasks", "tiny_other", OTHER_DOCS)
    (tasks / "tiny_pair.yaml").write_text("group: tiny_pair\ntask:\n  - tiny_mc\n  - tiny_other\n")
    stores = {}
    for task in ("tiny_mc", "tiny_other"):
        stores[task] = root / f"refs-{task}"
        code = main(["build-reference", "--model", str(tiny_model_dir), "--model_args", "dtype=float32",
                     "--device", "cpu", "--tasks", task, "--include_path", str(tiny_task_dir), "--include_path",
                     str(tasks), "--keep", "all", "--out", str(stores[task])])
        assert code == 0
    return [str(tiny_task_dir), str(tasks)], stores, root


def _evaluate(tiny_model_dir, include, reference: str, diagnostics=None):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = f"pretrained={tiny_model_dir},dtype=float32,method=kernel_regression,k=1,reference={reference}"
    if diagnostics:
        args += f",diagnostics={diagnostics}"
    return simple_evaluate(model="c3po", model_args=args, tasks=["tiny_pair"], device="cpu",
                           task_manager=TaskManager(include_path=include))


def test_each_task_retrieves_from_its_own_store(tiny_model_dir, pair, tmp_path):
    include, stores, _ = pair
    diag = tmp_path / "diag.jsonl"
    out = _evaluate(tiny_model_dir, include, f"tiny_mc={stores['tiny_mc']}+tiny_o*={stores['tiny_other']}", diag)
    assert {"tiny_mc", "tiny_other"} <= set(out["results"])
    other_questions = {doc["question"] for doc in OTHER_DOCS}
    records = [json.loads(line) for line in diag.read_text().splitlines()]
    seen = {"tiny_mc": 0, "tiny_other": 0}
    for record in records:
        task = "tiny_other" if any(q in record["context"] for q in other_questions) else "tiny_mc"
        assert record["neighbours"] and all(n["source"].startswith(task + "/") for n in record["neighbours"])
        seen[task] += 1
    assert seen["tiny_mc"] > 0 and seen["tiny_other"] > 0


def test_a_task_without_a_store_is_refused_before_scoring(tiny_model_dir, pair):
    include, stores, _ = pair
    with pytest.raises(C3POConfigError, match=r"no reference store for task\(s\) \['tiny_other'\]"):
        _evaluate(tiny_model_dir, include, f"tiny_mc={stores['tiny_mc']}")


def test_mapping_file_and_malformed_mappings(pair, tmp_path):
    _, stores, root = pair
    mapping = tmp_path / "stores.yaml"
    mapping.write_text(f"tiny_mc: {stores['tiny_mc']}\n'tiny_o*': [{stores['tiny_other']}]\n")
    config = C3POConfig.from_model_args({"reference": str(mapping), "method": "ngd"})
    assert config.stores_by_task() == {"tiny_mc": (str(stores["tiny_mc"]),), "tiny_o*": (str(stores["tiny_other"]),)}
    assert C3POConfig.from_model_args({"reference": "a+b"}).stores_by_task() == {"*": ("a", "b")}
    with pytest.raises(C3POConfigError, match="mixes task=store pairs with bare stores"):
        C3POConfig.from_model_args({"reference": "tiny_mc=a+b"})
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(C3POConfigError, match="must map lm-eval task names"):
        C3POConfig.from_model_args({"reference": str(tmp_path / "bad.yaml")})
