"""Every reference task's gold is the right answer: checked on fixture docs whose answer is known.

The fixture rows (tests/fixtures/data/, each dataset's own schema) were written with the answer
in mind: "Is the sun a star?" is yes, a spider has eight legs, the Nile ends in the Mediterranean.
A gold that points at another choice (MultiRC's, as lm-eval's built-in YAML has it) would make
the builder keep the docs the model gets wrong.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets
import pytest
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

import lm_eval.tasks
from reference_builders.scoring import gold_index

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "tests" / "fixtures" / "task_configs_local"
REFERENCE = ROOT / "task_configs" / "reference"
BUILTIN = Path(lm_eval.tasks.__file__).resolve().parent

# The right answer of each fixture doc, in fixture order (after the task's own process_docs).
RIGHT_ANSWERS = {
    "c3po_ref_boolq": ["yes", "no", "yes", "no", "no", "yes"],
    "c3po_ref_cb": ["True", "False", "Neither", "True", "False", "Neither"],
    "c3po_ref_copa": [" he dropped a hammer on his foot.", " the liquid in the bottle poured out.",
                      " i turned on the light.", " she ran a race.", " it was left in the sun.",
                      " the mother picked her up."],
    "c3po_ref_rte": ["True", "False", "True", "False", "True", "False"],
    "c3po_ref_wic": ["yes", "no", "yes", "no", "yes", "no"],
    "c3po_ref_wsc": ["yes", "no", "yes", "no", "yes", "no"],
    # One candidate per question survives; its verdict is yes exactly when the candidate is right.
    "c3po_ref_multirc": ["In the Mediterranean Sea\nIs the answer correct? yes", "North\nIs the answer correct? yes",
                         "Cookies\nIs the answer correct? no"],
    "c3po_ref_commonsense_qa": ["A", "B", "C", "D", "E", "A"],  # sink, sleep, refrigerator, pen, library, melts
    "c3po_ref_social_iqa": None,  # filled from the fixture below: label is 1-based
    "c3po_ref_openbookqa": None,
    "c3po_ref_sciq": None,
    "c3po_ref_bigbench_general_knowledge": ["eight", "blue", "apple", "24", "honey"],
}


@pytest.fixture(scope="module")
def tasks():
    manager = TaskManager(include_path=str(LOCAL), include_defaults=False)
    return manager.load(list(RIGHT_ANSWERS) + ["c3po_ref_knowref"])["tasks"]


def _golds(task) -> list[str]:
    out = []
    for doc in task.eval_docs:
        choices = [str(c) for c in task.doc_to_choice(doc)]
        out.append(choices[gold_index(task, doc, choices)])
    return out


@pytest.mark.parametrize("name", [n for n, a in RIGHT_ANSWERS.items() if a is not None])
def test_gold_is_the_right_answer(tasks, name):
    assert _golds(tasks[name]) == RIGHT_ANSWERS[name]


def test_gold_of_answer_field_datasets(tasks):
    """Datasets that name the right answer in a field: the gold choice is that answer's text."""
    assert _golds(tasks["c3po_ref_sciq"]) == [d["correct_answer"] for d in tasks["c3po_ref_sciq"].eval_docs]
    obqa = tasks["c3po_ref_openbookqa"]
    assert _golds(obqa) == [d["choices"]["text"][d["choices"]["label"].index(d["answerKey"])] for d in obqa.eval_docs]
    siqa = tasks["c3po_ref_social_iqa"]
    assert _golds(siqa) == [d["answer" + "ABC"[int(d["label"]) - 1]] for d in siqa.eval_docs]
    assert _golds(siqa)[0] == "wet and cold"  # "Tracy ... got soaked in the rain. How would Tracy feel?"


def test_lm_evals_own_multirc_gold_is_inverted():
    """Why our MultiRC differs from the built-in: there, label 1 (answer correct) points at "... no"."""
    builtin = load_yaml(BUILTIN / "super_glue" / "multirc" / "default.yaml")
    ours = load_yaml(REFERENCE / "superglue" / "c3po_ref_multirc.yaml")
    assert builtin["doc_to_target"] == ours["doc_to_target"] == "label"
    assert builtin["doc_to_choice"].index("yes") < builtin["doc_to_choice"].index("no")
    assert ours["doc_to_choice"].index("no") < ours["doc_to_choice"].index("yes")
    assert builtin["doc_to_choice"].replace("yes", "X").replace("no", "yes").replace("X", "no") == ours["doc_to_choice"]


def test_knowref_gold_and_malformed_rows(tasks):
    knowref = tasks["c3po_ref_knowref"]
    docs = list(knowref.eval_docs)
    assert knowref.doc_to_choice(docs[2])[knowref.doc_to_target(docs[2])] == "Taylor"  # "...because she had switched the phone off"
    missing_candidate, bad_gold = docs[-2], docs[-1]
    with pytest.raises(ValueError, match="candidate_1"):
        knowref.doc_to_choice(missing_candidate)
    with pytest.raises(ValueError, match="correct_candidate"):
        knowref.doc_to_target(bad_gold)


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bigbench_keeps_only_single_gold_docs():
    bigbench_ref = _module(REFERENCE / "bigbench" / "bigbench_ref.py")
    rows = [
        {"targets": ["b"], "multiple_choice_targets": ["a", "b"], "multiple_choice_scores": [0, 1]},  # kept
        {"targets": ["a", "b"], "multiple_choice_targets": ["a", "b", "c"], "multiple_choice_scores": [1, 1, 0]},  # two right
        {"targets": ["a"], "multiple_choice_targets": ["a", "a", "c"], "multiple_choice_scores": [1, 0, 0]},  # gold listed twice
        {"targets": ["c"], "multiple_choice_targets": ["a", "b", "c"], "multiple_choice_scores": [1, 0, 0]},  # target != scored
        {"targets": ["x"], "multiple_choice_targets": [], "multiple_choice_scores": []},  # free-form (lm-eval's filter)
    ]
    kept = bigbench_ref.single_gold_docs(datasets.Dataset.from_list([{**r, "idx": i} for i, r in enumerate(rows)]))
    assert kept["idx"] == [0]


def test_multirc_keeps_one_candidate_per_question_whatever_the_row_order():
    multirc_ref = _module(REFERENCE / "superglue" / "multirc_ref.py")
    rows = [{"idx": {"paragraph": p, "question": q, "answer": a}, "row": i}
            for i, (p, q, a) in enumerate([(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 3), (1, 2, 4), (1, 2, 5)])]
    kept = multirc_ref.one_answer_per_question(datasets.Dataset.from_list(rows))
    assert sorted((r["idx"]["paragraph"], r["idx"]["question"]) for r in kept) == [(0, 0), (0, 1), (1, 2)]
    shuffled = multirc_ref.one_answer_per_question(datasets.Dataset.from_list(rows[::-1]))
    assert sorted(r["idx"]["answer"] for r in shuffled) == sorted(r["idx"]["answer"] for r in kept)
