"""Planted-pathway benchmark: a known-answer test that C3PO repairs bad routing end to end.

No pretrained MoE can be downloaded in tests or in the offline demo, so this
module *makes* one whose failure mode is known, and a task on which C3PO's
premise holds by construction.

What is planted
---------------
* **World and task** (:mod:`lm_eval_c3po.demo.planted_data`). 40 people, 16
  cities; every person has four distinct cities, one per *skill* (relation):
  birth, work, study, holiday. A question asks one skill of one person in one of
  six paraphrases per skill (each with several skill-specific words: "born",
  "birthplace", "commutes", "office", "university", "vacation", ...) and ends
  with an answer cue, ``Answer:`` or ``Reply:``. The four choices are the
  person's four cities, so every distractor is "the answer another skill would
  give about the same person". Multiple choice, lm-eval style (context,
  choices, gold index, ``target_delimiter=" "``); every answer is one token.
* **A tiny OLMoE** (``OlmoeForCausalLM``: 4 layers, 8 experts, top-2,
  ``norm_topk_prob=True``, hidden 64; word-level tokenizer) trained here in
  about a minute on one CPU thread. At the **last context token of the last MoE
  layer (MoE layer 3, the critical layer)** skill ``s`` is executed by expert
  ``SKILL_EXPERT[s]``: during training the routing of that one token is forced
  to random expert pairs and the answer target is the *forced* experts' cities
  for the person (a soft mixture, sharper for the heavier expert), independent of
  what the question asks. So expert ``SKILL_EXPERT[s]`` computes "the city of
  skill s of the person named in the context", nothing below layer 3 can know
  the answer, and the model's answer is whatever the layer-3 routing at the last
  context token says. The router of that layer is trained separately (a
  supervised auxiliary loss) to send skill ``s`` to ``SKILL_EXPERT[s]`` (target
  weight 0.5, plus a generic expert at 0.3). Lower MoE layers are also routed by
  skill at the last token (auxiliary targets), like topic-specialised experts,
  and see random routing noise there in training so that their experts are not
  load-bearing for the answer.
* **The perturbed router** (the *planted fault*). A second head for the same
  layer-3 router is trained jointly on the same hidden states, with the same
  target except on questions whose cue is ``Reply:``: there it prefers the *next*
  skill's expert ``SKILL_EXPERT[(s+1) % 4]`` (0.46) over the right one (0.23),
  which stays second (ahead of the skill's generic expert at 0.15). With top-2
  renormalisation the wrong expert gets 2/3 of the mix and the
  model answers the next skill's city. The **perturbed model**
  and the **control model** are the same weights except
  ``model.layers.3.mlp.gate.weight`` (perturbed head vs. control head).

Why it is a fair test of C3PO
-----------------------------
* The reference split and the test split are drawn from the same distribution
  (half ``Answer:``, half ``Reply:``; balanced skills) but about *disjoint
  people* (people 0-19 vs. 20-39), so no neighbour carries the test answer; the
  neighbours' gold answers are other people's cities.
* Nothing tells the method which questions are perturbed. The reference builder
  keeps only correctly answered references (as the paper does); with the
  perturbed model those are exactly the ``Answer:`` ones, whose routing is right.
  The ``Reply:`` references are answered wrongly and drop out on their own.
* The test question's neighbours come from the real sentence embedder
  (all-MiniLM-L6-v2) over the question text; the paraphrases make "same skill"
  the dominant similarity (measured: 100% of the 3 nearest correct references
  of every test question share its skill), while the cue barely moves the
  embedding. The fault keys on a formatting detail, not on meaning, so
  semantically similar successful questions carry the right pathway; this is
  the paper's hypothesis, planted.
* The right expert stays inside the perturbed top-2, so gradient methods (which
  only see the selected experts' weights) can reach the fix; the oracle shows
  the headroom.
* The control model (unperturbed router) answers essentially everything
  correctly; a method must not break it.
* The model is trained on every question of the world (both splits' people):
  what is tested is routing, not generalisation; it "knows" every person's
  cities and only needs the right expert. Layer 0's attention head 0 is
  hand-initialised to attend to the person's name (see ``plant_name_head``),
  which makes training take about a minute; everything else is learned.

Known limits of the construction (measured)
------------------------------------------
* Mode finding moves the pathway among *reference pathways* (no text
  similarity). On the critical layer alone the faulty pathway (wrong expert
  0.46) is nearer the *next* skill's correct pathways than its own skill's, so
  mode finding over layer 3 only cannot repair it. The lower layers are routed
  by skill and agree between ``Answer:`` and ``Reply:``, so with two or more MoE
  layers in the pathway (``last:2``, or the default ``last:5`` = all four) the
  nearest reference pathways are the right skill's. Kernel regression, NGD and
  the oracle work with any of these layer sets.
* A ``Reply:`` question is answered right only by chance if at all (measured 0%),
  so no faulty pathway enters a reference store built from correct answers.

What it does not prove
----------------------
It does not show that real pretrained MoEs have such routing faults, that
their critical layers are the last ones, that real benchmark neighbours share
pathways, or the size of gains on MMLU & co. It is a correctness and plumbing
test of capture -> store -> retrieval -> re-mixing -> scoring with a known
answer, and a sanity check that methods do not hurt a well-routed model.
Accuracies here are properties of the planted construction.

API
---
``build_planted(out_dir, seed=0, n_ref=480, n_test=240, perturbed=True) -> PlantedPaths``
writes ``out_dir/{perturbed,control}`` (model + tokenizer directories loadable
with ``AutoModelForCausalLM`` / ``AutoTokenizer`` offline), ``out_dir/data/
{ref,test}.jsonl`` and ``out_dir/tasks/{planted_ref,planted_test}.yaml`` (lm-eval
``multiple_choice`` over ``dataset_path: json`` with absolute ``data_files``).
It is idempotent: a matching ``out_dir/planted.json`` fingerprint is reused.
``PlantedPaths.model`` is the perturbed model when ``perturbed=True``, else the
control. ``c3po demo`` builds it and measures base, mode finding, kernel
regression, NGD (through ``lm_eval --model c3po``) and the oracle on it.

Other families and variants: ``family=`` builds the same layout in any
family of :data:`lm_eval_c3po.routing.FAMILIES` (its own config class and
router; DeepSeek's dense first layer comes on top of the four MoE layers), and
``critical_layer``, ``token_offset``, ``fault`` and ``decoys`` move the fault
or add retrieval noise (see :class:`~lm_eval_c3po.demo.planted_train.PlantedConfig`
and :mod:`lm_eval_c3po.demo.suite`, which runs them all).

Modules: :mod:`~lm_eval_c3po.demo.planted_data` (world and questions),
:mod:`~lm_eval_c3po.demo.planted_model` (routing layout, targets, tokenizer,
model, scoring), :mod:`~lm_eval_c3po.demo.planted_train` (training) and this
one (build and export); :mod:`~lm_eval_c3po.demo.suite` runs the family/variant suite.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lm_eval_c3po.demo import planted_data as pdata
from lm_eval_c3po.demo import planted_model as pm
from lm_eval_c3po.demo.planted_train import FORMAT_VERSION, PlantedConfig, train
from lm_eval_c3po.routing import RoutingController


@dataclass
class PlantedPaths:
    root: Path
    model: Path  # the model the caller asked for (perturbed or control)
    perturbed_model: Path
    control_model: Path
    ref_jsonl: Path
    test_jsonl: Path
    task_dir: Path  # --include_path for lm_eval: tasks planted_ref and planted_test
    manifest: Path
    runs: Path  # what is derived from these models (stores, adapters, results): cleared when they are rebuilt
    info: dict = field(default_factory=dict)


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps(d, sort_keys=True) + "\n")


def _task_yaml(name: str, data_file: Path) -> str:
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data_file))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        'target_delimiter: " "\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def _write_task_yamls(paths: PlantedPaths) -> None:
    paths.task_dir.mkdir(parents=True, exist_ok=True)
    for name, data in (("planted_ref", paths.ref_jsonl), ("planted_test", paths.test_jsonl)):
        target = paths.task_dir / f"{name}.yaml"
        text = _task_yaml(name, data)
        if not target.exists() or target.read_text() != text:
            target.write_text(text)


def _save_model_dir(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def build_planted(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_ref: int = 480,
    n_test: int = 240,
    perturbed: bool = True,
    log=print,
    **overrides,
) -> PlantedPaths:
    """Generate (or reuse) the planted benchmark under ``out_dir``; see the module docstring."""
    cfg = PlantedConfig(seed=seed, n_ref=n_ref, n_test=n_test, **overrides)
    cfg.validate()
    root = Path(out_dir).resolve()
    paths = PlantedPaths(
        root=root,
        model=root / ("perturbed" if perturbed else "control"),
        perturbed_model=root / "perturbed",
        control_model=root / "control",
        ref_jsonl=root / "data" / "ref.jsonl",
        test_jsonl=root / "data" / "test.jsonl",
        task_dir=root / "tasks",
        manifest=root / "planted.json",
        runs=root / "runs",
    )
    fp = cfg.fingerprint()
    if paths.manifest.exists():
        info = json.loads(paths.manifest.read_text())
        needed = [paths.perturbed_model / "config.json", paths.control_model / "config.json",
                  paths.ref_jsonl, paths.test_jsonl, paths.task_dir / "planted_test.yaml"]
        if info.get("fingerprint") == fp and all(p.exists() for p in needed):
            _write_task_yamls(paths)  # the directory may have moved: refresh the absolute data paths
            paths.info = info
            return paths

    for sub in ("perturbed", "control", "data", "tasks", "runs"):
        shutil.rmtree(root / sub, ignore_errors=True)
    if paths.manifest.exists():
        paths.manifest.unlink()
    root.mkdir(parents=True, exist_ok=True)

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        random.seed(seed)
        world = pdata.make_world(seed)
        ref, test = pdata.make_splits(world, seed, n_ref, n_test, cfg.decoys)
        tokenizer = pm.make_tokenizer()
        model = pm.make_model(cfg.seed, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, tokenizer,
                              family=cfg.family)
        t0 = time.time()
        result = train(cfg, model, tokenizer, world, log=log)

        (root / "data").mkdir(parents=True, exist_ok=True)
        _write_jsonl(paths.ref_jsonl, ref)
        _write_jsonl(paths.test_jsonl, test)
        _write_task_yamls(paths)

        _save_model_dir(model, tokenizer, paths.control_model)
        critical = RoutingController(model).layers[cfg.critical_layer].router
        with torch.no_grad():
            critical.weight.copy_(result["w_pert"])
        _save_model_dir(model, tokenizer, paths.perturbed_model)

        info = {
            "format": FORMAT_VERSION,
            "fingerprint": fp,
            "config": asdict(cfg),
            "critical_moe_layer": cfg.critical_layer,
            "critical_token_offset": cfg.token_offset,
            "fault": cfg.fault_kind,
            "skill_expert": pm.SKILL_EXPERT,
            "skills": pdata.SKILLS,
            "cues": {"clean": pdata.CUE_CLEAN, "planted": pdata.CUE_PLANTED},
            "train_seconds": result["train_seconds"],
            "final_lm_loss": result["final_lm_loss"],
            "build_seconds": round(time.time() - t0, 1),
        }
        paths.manifest.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        paths.info = info
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
    return paths


def load_split(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> None:
    """``python -m lm_eval_c3po.demo.planted OUT_DIR [--seed N]``: build (or reuse) the benchmark only.

    ``c3po demo`` builds it and measures every method through lm-eval.
    """
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.time()
    paths = build_planted(args.out_dir, seed=args.seed)
    print(f"[planted] built/reused {paths.root} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
