"""Shared test set-up: everything offline, deterministic and small."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# Fail fast on any stray hub call instead of hanging (set before transformers/datasets import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """Imports a script of ``benchmarks/`` by name, its sibling modules importable as when it runs."""

    def load(name: str):
        sys.path.insert(0, str(BENCHMARKS))
        try:
            spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        finally:
            sys.path.remove(str(BENCHMARKS))

    return load


@pytest.fixture()
def one_thread():
    """The planted models are tiny: with two threads on a busy machine an oracle step takes 100x longer."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """``--model c3po`` over the tiny OLMoE in float32 (method base: each test builds the Remixer it needs)."""
    from lm_eval_c3po.lm_eval_model import C3POLM

    return C3POLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=4)


def remixer_for(lm, store_dir, **options):
    """A Remixer over ``store_dir`` with ``options`` (c3po model_args) resolved for ``lm``'s model."""
    from lm_eval_c3po.remix import C3POConfig, Remixer

    config = C3POConfig.from_model_args({"reference": str(store_dir), **options}).resolved_for(lm.routing)
    return Remixer.from_lm(lm, config)


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random OLMoE with the offline tokenizer (``pretrained=`` path)."""
    from lm_eval_c3po.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "olmoe", "olmoe", seed=0)


@pytest.fixture(scope="session")
def tiny_task_dir(tmp_path_factory):
    """An ``--include_path`` folder holding the local multiple-choice task ``tiny_mc``."""
    from lm_eval_c3po.testing import write_mc_task

    docs = [{"question": q, "choices": c, "answer": a} for q, c, a in TINY_MC_DOCS]
    return write_mc_task(tmp_path_factory.mktemp("tasks"), "tiny_mc", docs)


@pytest.fixture(scope="session")
def tiny_store_dir(tiny_model_dir, tiny_task_dir, tmp_path_factory):
    """A reference store of every tiny_mc doc (``--keep all``), built by `c3po build-reference`."""
    from lm_eval_c3po.cli import main

    out = tmp_path_factory.mktemp("refs") / "tiny"
    code = main(["build-reference", "--model", str(tiny_model_dir), "--model_args", "dtype=float32",
                 "--device", "cpu", "--tasks", "tiny_mc", "--include_path", str(tiny_task_dir),
                 "--keep", "all", "--out", str(out)])
    assert code == 0
    return out


ALL_SLOTS = "first:3+middle:3+last:3"  # every token slot of the paper's token ablation


@pytest.fixture(scope="session")
def slot_store_dir(tiny_model_dir, tiny_task_dir, tmp_path_factory):
    """A store of every tiny_mc doc with the routing of every slot the paper's token ablation uses."""
    from lm_eval_c3po.cli import main

    out = tmp_path_factory.mktemp("refs") / "slots"
    code = main(["build-reference", "--model", str(tiny_model_dir), "--model_args", "dtype=float32",
                 "--device", "cpu", "--tasks", "tiny_mc", "--include_path", str(tiny_task_dir),
                 "--keep", "all", "--tokens", ALL_SLOTS, "--out", str(out)])
    assert code == 0
    return out
