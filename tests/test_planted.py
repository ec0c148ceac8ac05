"""The planted-pathway benchmark: determinism, disjoint splits, the planted fault, the base/oracle gap."""

from __future__ import annotations

import json

import pytest
import torch

from lm_eval_c3po.demo import planted as P
from lm_eval_c3po.demo import planted_data as D
from lm_eval_c3po.demo import planted_model as M
from lm_eval_c3po.demo.planted_train import PlantedConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _files(root):
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            rel = str(path.relative_to(root))
            data = path.read_bytes()
            if rel == "planted.json":  # timings differ between builds, everything else must not
                info = json.loads(data)
                for key in ("train_seconds", "build_seconds"):
                    info.pop(key)
                data = json.dumps(info, sort_keys=True).encode()
            elif rel.endswith(".yaml"):  # holds the absolute data path
                data = data.replace(str(root).encode(), b"<root>")
            out[rel] = data
    return out


def test_build_is_deterministic_and_idempotent(tmp_path):
    kw = dict(seed=3, n_ref=16, n_test=16, steps=4, log=lambda *_: None)
    a = P.build_planted(tmp_path / "a", **kw)
    b = P.build_planted(tmp_path / "b", **kw)
    fa, fb = _files(a.root), _files(b.root)
    assert sorted(fa) == sorted(fb)
    assert "perturbed/model.safetensors" in fa and "control/model.safetensors" in fa
    for rel in fa:
        assert fa[rel] == fb[rel], rel
    # a second call with the same config reuses the directory
    mtime = (a.perturbed_model / "model.safetensors").stat().st_mtime_ns
    again = P.build_planted(tmp_path / "a", **kw)
    assert (again.perturbed_model / "model.safetensors").stat().st_mtime_ns == mtime
    assert again.info["fingerprint"] == a.info["fingerprint"]
    # another seed is another benchmark (and another fingerprint)
    assert D.make_splits(D.make_world(4), 4, 16, 16) != D.make_splits(D.make_world(3), 3, 16, 16)
    assert PlantedConfig(seed=4).fingerprint() != PlantedConfig(seed=3).fingerprint()


def test_splits_are_disjoint_and_balanced():
    world = D.make_world(0)
    ref, test = D.make_splits(world, 0, 480, 240)
    assert len(ref) == 480 and len(test) == 240
    assert not {d["id"] for d in ref} & {d["id"] for d in test}
    assert not {d["context"] for d in ref} & {d["context"] for d in test}
    assert not {d["person"] for d in ref} & {d["person"] for d in test}
    for docs in (ref, test):
        assert sum(d["planted"] for d in docs) == len(docs) // 2
        for skill in D.SKILLS:
            assert sum(d["skill"] == skill for d in docs) == len(docs) // len(D.SKILLS)
        for d in docs:
            assert len(set(d["choices"])) == 4 and d["choices"][d["gold"]] == world.cities[d["person"]][d["skill"]]
            assert d["context"].endswith(d["cue"]) and d["planted"] == (d["cue"] == D.CUE_PLANTED)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small, briefly trained build (150 optimiser steps; the routers are exact by then, the answers not yet)."""
    return P.build_planted(tmp_path_factory.mktemp("planted"), n_ref=48, n_test=48, steps=150,
                           log=lambda *_: None)


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_model_dirs_load_offline_and_differ_only_in_the_critical_router(small):
    pert, tok = load(small.perturbed_model)
    ctrl, _ = load(small.control_model)
    assert type(pert).__name__ == "OlmoeForCausalLM"
    sp, sc = pert.state_dict(), ctrl.state_dict()
    differ = [k for k in sp if not torch.equal(sp[k], sc[k])]
    assert differ == [f"model.layers.{M.CRITICAL_LAYER}.mlp.gate.weight"]
    assert tok(" Paris", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("Paris")]
    task = (small.task_dir / "planted_test.yaml").read_text()
    assert "multiple_choice" in task and str(small.test_jsonl) in task


def test_perturbed_routing_differs_exactly_on_the_planted_subset(small):
    docs = P.load_split(small.ref_jsonl) + P.load_split(small.test_jsonl)
    planted = torch.tensor([d["planted"] for d in docs])
    skill = torch.tensor([d["skill_index"] for d in docs])
    experts = torch.tensor(M.SKILL_EXPERT)
    routes = {}
    for which, path in (("perturbed", small.perturbed_model), ("control", small.control_model)):
        model, tok = load(path)
        routes[which] = M.last_token_routing(model, tok, docs)  # [N, L, E]
    rp, rc = routes["perturbed"], routes["control"]
    assert torch.equal(rp[:, : M.CRITICAL_LAYER], rc[:, : M.CRITICAL_LAYER])
    top_p, top_c = rp[:, M.CRITICAL_LAYER].argmax(-1), rc[:, M.CRITICAL_LAYER].argmax(-1)
    assert torch.equal(top_p != top_c, planted)
    assert torch.equal(top_c, experts[skill])
    assert torch.equal(top_p[planted], experts[(skill[planted] + 1) % len(experts)])
    # the right expert stays in the faulty top-2, so gradient methods can reach it
    top2 = rp[planted, M.CRITICAL_LAYER].topk(2, -1).indices
    assert bool((top2 == experts[skill[planted]][:, None]).any(1).all())


def test_base_oracle_gap(small, tmp_path):
    """The oracle through `c3po oracle` (lm-eval's requests and scoring) closes the planted gap."""
    from lm_eval_c3po.demo.runs import Bench, run_method
    from lm_eval_c3po.lm_eval_model import C3POLM

    test = P.load_split(small.test_jsonl)[:32]
    accuracy = {}
    for which, path in (("perturbed", small.perturbed_model), ("control", small.control_model)):
        lm = C3POLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=32)
        accuracy[which] = M.accuracy(M.choice_scores(lm.model, lm.tokenizer, test), test)
    oracle = run_method(Bench(small.perturbed_model, small.task_dir, tmp_path, limit=32), "oracle", "oracle",
                        layers="2+3")
    assert oracle.n == 32 and json.loads(oracle.results_file.read_text())["c3po"]["upper_bound"] is True
    assert accuracy["perturbed"] <= 0.7
    assert oracle.acc >= accuracy["perturbed"] + 0.25
    assert accuracy["control"] > accuracy["perturbed"]


@pytest.mark.slow
def test_demo_meets_the_targets(tmp_path):
    """The issue's targets, read from `c3po demo`'s own output (>= 200 held-out questions)."""
    from lm_eval_c3po.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    rows = {(r["variant"], r["method"]): r["acc"] for r in json.loads((tmp_path / "demo_results.json").read_text())}
    base = rows[("perturbed", "base")]
    assert base <= 0.60 and rows[("perturbed", "oracle")] >= 0.90
    assert rows[("perturbed", "ngd")] >= base + 0.20
    assert rows[("perturbed", "kernel_regression")] >= base + 0.15
    assert rows[("perturbed", "mode_finding")] >= base + 0.05
    for method in ("mode_finding", "kernel_regression", "ngd"):
        assert rows[("control", method)] >= rows[("control", "base")] - 0.02
    report = tmp_path / "report"  # the paired table and the Figure 4-6 pictures of the demo's own runs
    assert "McNemar" in (report / "paired.md").read_text()
    for figure in ("steps_*.png", "coverage_*.png", "cost_*.png"):
        assert list(report.glob(figure)), figure
