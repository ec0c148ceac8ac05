"""Shared test set-up: everything offline, deterministic and small."""

from __future__ import annotations

import os

# Fail fast on any stray hub call instead of hanging (set before transformers/datasets import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TINY_MC_DOCS = [
    ("What is the capital of France?", ["Paris", "London", "Rome"], 0),
    ("Which animal is a mammal?", ["trout", "whale", "shark"], 1),
    ("Where does the sun rise?", ["west", "north", "east"], 2),
    ("What boils at one hundred degrees?", ["water", "bread", "soup"], 0),
    ("What do you use to eat soup?", ["knife", "spoon", "book"], 1),
    ("Is the fox quick?", ["yes", "no"], 0),
    ("Where does the sun set?", ["east", "west", "south"], 1),
    ("What do people cut bread with?", ["spoon", "book", "knife"], 2),
]


def write_mc_task(directory, name: str, docs) -> None:
    """A local multiple-choice lm-eval task ``name`` (YAML + JSONL) in ``directory``."""
    import json

    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in docs))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random OLMoE with the offline tokenizer (``pretrained=`` path)."""
    from lm_eval_c3po.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "olmoe", "olmoe", seed=0)


@pytest.fixture(scope="session")
def tiny_task_dir(tmp_path_factory):
    """An ``--include_path`` folder holding the local multiple-choice task ``tiny_mc``."""
    directory = tmp_path_factory.mktemp("tasks")
    write_mc_task(directory, "tiny_mc", TINY_MC_DOCS)
    return directory
