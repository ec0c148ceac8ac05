"""task_configs/: the six benchmarks mirror lm-eval's built-ins, reference sets load, and the
offline fixture twins (tests/fixtures/task_configs_local) run through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval.tasks
import pytest
from lm_eval.api.task import ConfigurableTask
from lm_eval.config.task import TaskConfig
from lm_eval.tasks import TaskManager
from lm_eval.tasks._index import Kind
from lm_eval.tasks._yaml_loader import _import_func_in_yml, load_yaml

ROOT = Path(__file__).resolve().parent.parent
TASK_CONFIGS = ROOT / "task_configs"
LOCAL = ROOT / "tests" / "fixtures" / "task_configs_local"
BUILTIN = Path(lm_eval.tasks.__file__).resolve().parent

SIX = ["c3po_mmlu", "c3po_hellaswag", "c3po_arc_challenge", "c3po_arc_easy", "c3po_piqa", "c3po_winogrande"]
LOCAL_MMLU = ["abstract_algebra", "philosophy", "high_school_geography", "global_facts"]

# (our task, lm-eval built-in yaml, fixture file). Reference sets are compared too: they keep
# the built-in prompt and only move the eval split to train.
PAIRS = [
    *[(f"c3po_mmlu_{s}", f"mmlu/default/mmlu_{s}.yaml", f"mmlu_{s}.jsonl") for s in LOCAL_MMLU],
    ("c3po_hellaswag", "hellaswag/hellaswag.yaml", "hellaswag.jsonl"),
    ("c3po_arc_easy", "arc/arc_easy.yaml", "arc_easy.jsonl"),
    ("c3po_arc_challenge", "arc/arc_challenge.yaml", "arc_challenge.jsonl"),
    ("c3po_piqa", "piqa/piqa.yaml", "piqa.jsonl"),
    ("c3po_winogrande", "winogrande/default.yaml", "winogrande.jsonl"),
    ("c3po_ref_openbookqa", "openbookqa/openbookqa.yaml", "openbookqa.jsonl"),
    ("c3po_ref_sciq", "sciq/sciq.yaml", "sciq.jsonl"),
    ("c3po_ref_commonsense_qa", "commonsense_qa/default.yaml", "commonsense_qa.jsonl"),
    ("c3po_ref_social_iqa", "siqa/siqa.yaml", "social_iqa.jsonl"),
    ("c3po_ref_boolq", "super_glue/boolq/default.yaml", "boolq.jsonl"),
    ("c3po_ref_copa", "super_glue/copa/default.yaml", "copa.jsonl"),
    ("c3po_ref_cb", "super_glue/cb/default.yaml", "cb.jsonl"),
    ("c3po_ref_rte", "super_glue/rte/default.yaml", "rte.jsonl"),
    ("c3po_ref_wic", "super_glue/wic/default.yaml", "wic.jsonl"),
    ("c3po_ref_wsc", "super_glue/wsc/default.yaml", "wsc.jsonl"),
    (
        "c3po_ref_bigbench_general_knowledge",
        "bigbench/multiple_choice/general_knowledge.yaml",
        "bigbench_general_knowledge.jsonl",
    ),
]


# ----------------------------------------------------------------------------- helpers


def _yaml_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.yaml") if "__pycache__" not in p.parts)


def _normalised(cfg: dict) -> dict:
    """Config with functions as 'module.name' (ours import lm-eval's own) and metrics as names."""
    out = {}
    for key, value in cfg.items():
        if value is None:  # `key: null` and an absent key mean the same to lm-eval
            continue
        if callable(value):
            value = f"{value.__module__.rsplit('/', 1)[-1]}.{value.__qualname__}"
        out[key] = value
    if "metric_list" in out:
        out["metric_list"] = sorted(m["metric"] for m in out["metric_list"])
    return out


def _builtin_task(rel_yaml: str, data_file: str) -> ConfigurableTask:
    """lm-eval's own task, pointed at the same fixture rows as ours."""
    cfg = load_yaml(BUILTIN / rel_yaml, resolve_func=True)
    cfg.pop("tag", None)
    cfg["custom_dataset"] = _import_func_in_yml("local_data.load", LOCAL)
    cfg["dataset_kwargs"] = {"data_files": data_file}
    return ConfigurableTask(config=cfg)


def _requests(task) -> list[tuple]:
    task.build_all_requests(limit=None)
    return [(inst.doc_id, inst.idx, inst.arguments) for inst in task.instances]


@pytest.fixture(scope="module")
def repo_tm() -> TaskManager:
    return TaskManager(include_path=str(TASK_CONFIGS), include_defaults=False)


@pytest.fixture(scope="module")
def local_tm() -> TaskManager:
    return TaskManager(include_path=str(LOCAL), include_defaults=False)


# ----------------------------------------------------------------------------- indexing


def test_every_yaml_in_task_configs_is_indexed_and_resolves(repo_tm):
    """Each YAML is a task or group in lm-eval's index (a YAML the index silently skips fails
    here), its !functions import, and each task's config validates, without touching data."""
    files = _yaml_files(TASK_CONFIGS)
    assert len(files) > 57
    for path in files:
        cfg = load_yaml(path, resolve_func=True)  # raises if a !function does not import
        name = cfg.get("group") or cfg.get("task")
        entry = repo_tm._index.get(name)
        assert entry is not None and entry.yaml_path == path.resolve(), path
        if entry.kind is Kind.TASK:
            task_cfg = TaskConfig(**{k: v for k, v in cfg.items() if k != "tag"})
            assert task_cfg.output_type == "multiple_choice", name
            assert "acc" in [m["metric"] for m in task_cfg.metric_list], name


def test_group_structure(repo_tm):
    index = repo_tm._index
    six = load_yaml(TASK_CONFIGS / "c3po_six.yaml", resolve_func=False)
    assert six["task"] == SIX
    per_category = {c: len(index[f"c3po_mmlu_{c}_tasks"].tags) for c in ("stem", "other", "social_sciences", "humanities")}
    assert per_category == {"stem": 19, "other": 13, "social_sciences": 12, "humanities": 13}
    presets = {
        "c3po_ref_mmlu": ["c3po_ref_bigbench", "c3po_ref_superglue"],
        "c3po_ref_commonsense": ["c3po_ref_commonsense_qa", "c3po_ref_social_iqa"],
        "c3po_ref_arc": ["c3po_ref_openbookqa", "c3po_ref_sciq"],
        "c3po_ref_winogrande": ["c3po_ref_knowref"],
    }
    for group, members in presets.items():
        assert index[group].kind is Kind.GROUP
        assert index[group].cfg["task"] == members
        assert all(m in index for m in members)
    assert len(index["c3po_ref_superglue_tasks"].tags) == 7
    assert len(index["c3po_ref_bigbench_tasks"].tags) >= 10


def test_reference_sets_are_harvested_from_train(repo_tm):
    refs = [n for n, e in repo_tm._index.items() if n.startswith("c3po_ref_") and e.kind is Kind.TASK]
    assert len(refs) >= 20
    for name in refs:
        assert repo_tm._index[name].cfg["test_split"] == "train", name


# ----------------------------------------------------------------------------- equality with lm-eval


def test_mmlu_subjects_are_lm_evals(repo_tm):
    builtin = sorted(p.stem.removeprefix("mmlu_") for p in (BUILTIN / "mmlu" / "default").glob("mmlu_*.yaml"))
    ours = sorted(n.removeprefix("c3po_mmlu_") for n, e in repo_tm._index.items()
                  if n.startswith("c3po_mmlu_") and e.kind is Kind.TASK)
    assert ours == builtin and len(ours) == 57
    for subject in ours:
        mine = load_yaml(TASK_CONFIGS / "mmlu" / f"c3po_mmlu_{subject}.yaml")
        theirs = load_yaml(BUILTIN / "mmlu" / "default" / f"mmlu_{subject}.yaml")
        for cfg in (mine, theirs):
            cfg.pop("task"), cfg.pop("tag")
        assert mine == theirs, subject


# Keys where a reference set may differ from its built-in: the harvest split, decontamination
# (not used for harvesting), and cb's extra f1 metric.
REF_FREE_KEYS = {"test_split", "should_decontaminate", "doc_to_decontamination_query", "metadata", "metric_list"}
# Deliberate differences (README, "Task configs"): BIG-Bench reference docs must have one right choice.
REF_OWN_KEYS = {"c3po_ref_bigbench_general_knowledge": {"process_docs": "bigbench_ref.single_gold_docs"}}


@pytest.mark.parametrize("ours,builtin,_data", PAIRS, ids=[p[0] for p in PAIRS])
def test_config_fields_match_builtin(repo_tm, ours, builtin, _data):
    mine = _normalised(load_yaml(repo_tm._index[ours].yaml_path))
    theirs = _normalised(load_yaml(BUILTIN / builtin))
    for cfg in (mine, theirs):
        for key in ("task", "tag", "task_alias"):
            cfg.pop(key, None)
    if ours.startswith("c3po_ref_"):
        assert mine["test_split"] == "train"
        assert "acc" in mine["metric_list"]
        assert set(mine["metric_list"]) <= set(theirs["metric_list"])
        for key, value in REF_OWN_KEYS.get(ours, {}).items():
            assert mine.pop(key) == value and theirs.pop(key) != value
        for cfg in (mine, theirs):
            for key in REF_FREE_KEYS:
                cfg.pop(key, None)
    assert mine == theirs


@pytest.mark.parametrize("ours,builtin,data", PAIRS, ids=[p[0] for p in PAIRS])
def test_fixture_docs_render_like_builtin(local_tm, ours, builtin, data):
    """Every fixture doc gives the same contexts, continuations and gold through our config as
    through lm-eval's (including HellaSwag's preprocessing, MMLU's description and
    WinoGrande's partial scoring, which all live in the request arguments)."""
    mine = local_tm.load([ours])["tasks"][ours]
    theirs = _builtin_task(builtin, data)
    docs_mine, docs_theirs = list(mine.eval_docs), list(theirs.eval_docs)
    assert len(docs_mine) >= 4 and docs_mine == docs_theirs
    for doc in docs_mine:
        assert mine.doc_to_target(doc) == theirs.doc_to_target(doc)
        assert mine.doc_to_choice(doc) == theirs.doc_to_choice(doc)
    assert _requests(mine) == _requests(theirs)


def test_hellaswag_fixture_exercises_preprocessing(local_tm):
    task = local_tm.load(["c3po_hellaswag"])["tasks"]["c3po_hellaswag"]
    wikihow = next(d for d in task.eval_docs if d["source_id"].startswith("wikihow"))
    assert "[" not in task.doc_to_text(wikihow) and "[" in wikihow["ctx"]
    assert task.doc_to_target(wikihow) == 0 and isinstance(wikihow["label"], str)


# ----------------------------------------------------------------------------- KnowRef


def test_knowref_renders_a_question():
    knowref = load_yaml(TASK_CONFIGS / "reference" / "c3po_ref_knowref.yaml")
    doc = {
        "swapped_sentence": "Jordan could n't reach Taylor because [she] had switched the phone off .",
        "candidate0": "Jordan", "candidate1": "Taylor", "correct_candidate": "candidate_1",
        "original_sentence": "", "annotation_strength": "5",
    }
    text = knowref["doc_to_text"](doc)
    assert text == (
        "Jordan couldn't reach Taylor because she had switched the phone off.\n"
        'Question: In the sentence above, who does "she" refer to?\nAnswer:'
    )
    assert knowref["doc_to_choice"](doc) == ["Jordan", "Taylor"]
    assert knowref["doc_to_target"](doc) == 1
    # The dataset card's spelling of the candidate fields works too.
    carded = {**{k: v for k, v in doc.items() if not k.startswith("candidate")},
              "candidate_0": "Jordan", "candidate_1": "Taylor", "correct_candidate": "candidate_0"}
    assert knowref["doc_to_choice"](carded) == ["Jordan", "Taylor"]
    assert knowref["doc_to_target"](carded) == 0
    with pytest.raises(ValueError):
        knowref["doc_to_text"]({**doc, "swapped_sentence": "no pronoun marked ."})


# ----------------------------------------------------------------------------- local fixtures


def test_local_fixtures_do_not_depend_on_cwd(local_tm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = TaskManager(include_path=str(LOCAL), include_defaults=False).load(
        ["c3po_ref_arc", "c3po_ref_commonsense", "c3po_ref_winogrande", "c3po_ref_mmlu"]
    )
    sizes = {name: len(task.eval_docs) for name, task in loaded["tasks"].items()}
    # bigbench: one of its 6 rows has no choices and is dropped by lm-eval's own filter; multirc: 8
    # answer candidates of 3 questions, one kept per question; knowref: 6 good rows and 2 malformed.
    assert sizes == {
        "c3po_ref_openbookqa": 6, "c3po_ref_sciq": 6, "c3po_ref_commonsense_qa": 6,
        "c3po_ref_social_iqa": 6, "c3po_ref_knowref": 8, "c3po_ref_boolq": 6, "c3po_ref_copa": 6,
        "c3po_ref_cb": 6, "c3po_ref_multirc": 3, "c3po_ref_rte": 6, "c3po_ref_wic": 6, "c3po_ref_wsc": 6,
        "c3po_ref_bigbench_general_knowledge": 5,
    }


def test_local_mmlu_keeps_the_real_group_structure(local_tm):
    group_map = local_tm.load(["c3po_six"])["group_map"]
    assert group_map["c3po_six"] == SIX
    assert group_map["c3po_mmlu"] == ["c3po_mmlu_stem", "c3po_mmlu_other", "c3po_mmlu_social_sciences", "c3po_mmlu_humanities"]
    assert sorted(t for c in group_map["c3po_mmlu"] for t in group_map[c]) == sorted(f"c3po_mmlu_{s}" for s in LOCAL_MMLU)


def test_c3po_six_is_the_mean_of_six_benchmarks(local_tm):
    """With made-up scores where a mean over the 9 leaves would differ from the paper's mean
    over 6 benchmarks (MMLU counted once, with its size-weighted score)."""
    loaded = local_tm.load(["c3po_six"])
    groups = loaded["groups"]
    accs = {"c3po_hellaswag": 0.1, "c3po_arc_challenge": 0.2, "c3po_arc_easy": 0.3, "c3po_piqa": 0.4,
            "c3po_winogrande": 0.5, "c3po_mmlu_abstract_algebra": 1.0, "c3po_mmlu_philosophy": 0.0,
            "c3po_mmlu_high_school_geography": 0.0, "c3po_mmlu_global_facts": 0.0}
    sizes = {"c3po_mmlu_abstract_algebra": 30}
    metrics = {n: {"acc,none": a, "acc_stderr,none": 0.1, "sample_len": sizes.get(n, 10)} for n, a in accs.items()}
    for name in ["c3po_mmlu_stem", "c3po_mmlu_other", "c3po_mmlu_social_sciences", "c3po_mmlu_humanities",
                 "c3po_mmlu", "c3po_six"]:
        metrics[name] = groups[name].aggregate(metrics)
    mmlu = 30 / 60  # size-weighted over subjects, as lm-eval's mmlu
    assert metrics["c3po_mmlu"]["acc,none"] == pytest.approx(mmlu)
    assert metrics["c3po_six"]["acc,none"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 0.5 + mmlu) / 6)
    # stderr of a mean of 6 independent means, MMLU's being its own (pooled) stderr
    se_mmlu = metrics["c3po_mmlu"]["acc_stderr,none"]
    assert metrics["c3po_six"]["acc_stderr,none"] == pytest.approx((5 * 0.1**2 + se_mmlu**2) ** 0.5 / 6)
    # A benchmark without the metric: no c3po_six number rather than a mean of five.
    del metrics["c3po_piqa"]["acc,none"]
    assert "acc,none" not in groups["c3po_six"].aggregate(metrics)


# ----------------------------------------------------------------------------- the real CLI


def test_cli_runs_c3po_six_offline(tmp_path):
    from lm_eval_c3po.testing import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny", family="olmoe", seed=0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    lm_eval = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run(
        [str(lm_eval), "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
         "--tasks", "c3po_six", "--include_path", str(LOCAL), "--device", "cpu", "--batch_size", "32",
         "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    out = json.loads(results_file.read_text())
    results = out["results"]
    assert set(SIX) | {"c3po_six"} <= set(results)
    assert out["n-samples"]["c3po_arc_easy"]["effective"] == 6
    assert out["n-samples"]["c3po_mmlu_philosophy"]["effective"] == 4
    six_mean = sum(results[name]["acc,none"] for name in SIX) / 6
    assert results["c3po_six"]["acc,none"] == pytest.approx(six_mean)
    subjects = [f"c3po_mmlu_{s}" for s in LOCAL_MMLU]
    assert results["c3po_mmlu"]["acc,none"] == pytest.approx(sum(results[s]["acc,none"] for s in subjects) / 4)
