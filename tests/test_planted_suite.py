"""The planted benchmark on every MoE family and its variants (``c3po demo --suite``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lm_eval_c3po.demo import planted_data as D
from lm_eval_c3po.demo import planted_model as M
from lm_eval_c3po.demo import suite as S
from lm_eval_c3po.demo.planted_train import pair_omega
from lm_eval_c3po.routing import RoutingController
from lm_eval_c3po.testing import FAMILIES, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "phimoe"])
def test_forcing_a_pair_is_an_exact_override(family):
    """Training forces (pair, weights) as an override with omega = weights on the pair: the family's rule
    gives back exactly that pair and those weights (times DeepSeek's routed scaling factor)."""
    model = make_tiny_model(family, **({"norm_topk_prob": True} if family == "olmoe" else {}))
    moe = RoutingController(model).layers[-1]
    index = torch.tensor([[1, 6], [4, 3]])
    weights = torch.tensor([[0.7, 0.3], [0.55, 0.45]])
    logits = torch.randn(2, 8)
    got_w, got_i = moe.adapter.route(moe.router, pair_omega(index, weights), logits)
    order = got_i.argsort(-1)
    scale = getattr(moe.router, "routed_scaling_factor", 1.0)
    want_order = index.argsort(-1)
    assert torch.equal(got_i.gather(1, order), index.gather(1, want_order))
    assert torch.allclose(got_w.gather(1, order), scale * weights.gather(1, want_order), atol=1e-6)


def test_phimoe_forcing_selects_the_pair():
    """PhiMoE's sparsemixer weighs each selected expert about 1: forcing selects the pair, not the weights."""
    model = make_tiny_model("phimoe")
    moe = RoutingController(model).layers[-1]
    w, i = moe.adapter.route(moe.router, pair_omega(torch.tensor([[2, 5]]), torch.tensor([[0.7, 0.3]])),
                             torch.zeros(1, 8))
    assert sorted(i[0].tolist()) == [2, 5]
    assert torch.allclose(w, torch.ones_like(w), atol=1e-3)


def test_fault_kinds_rank_the_right_expert_second_or_third():
    for skill in range(4):
        right, wrong = M.SKILL_EXPERT[skill], M.SKILL_EXPERT[(skill + 1) % 4]
        for fault, rank in (("inside", 1), ("outside", 2)):
            t = M.perturbed_target(skill, True, fault)
            assert abs(float(t.sum()) - 1) < 1e-6
            order = t.argsort(descending=True).tolist()
            assert order[0] == wrong and order[rank] == right
    with pytest.raises(ValueError, match="unknown fault"):
        M.perturbed_target(0, True, "sideways")


def test_decoys_are_reference_only_retrieval_noise():
    world = D.make_world(0)
    ref, test = D.make_splits(world, 0, 480, 240, decoys=2)
    decoys = [d for d in ref if d["decoy"]]
    assert not any(d["decoy"] for d in test)
    assert 0.25 < len(decoys) / len(ref) < 0.42  # 2 of 6 paraphrases
    for d in decoys:  # worded as one skill, about (and routed as) the skill two on
        text_skill = D.SKILLS.index(d["id"].split("-")[1])
        assert d["skill_index"] == (text_skill + 2) % 4
        assert d["choices"][d["gold"]] == world.cities[d["person"]][d["skill"]]
    assert D.make_splits(world, 0, 480, 240) == D.make_splits(world, 0, 480, 240, decoys=0)


def test_paired_delta_and_table():
    delta, se = S.paired_delta([True, True, False, True], [False, True, False, False])
    assert delta == pytest.approx(50.0)
    assert se == pytest.approx(100 * (1 / 3) ** 0.5 / 2)  # diffs 1,0,0,1: sample variance 1/3
    with pytest.raises(ValueError, match="different question sets"):
        S.paired_delta([True], [True, False])
    cells = {(v, m): {"acc": acc, "n": 4, "correct": c}
             for (v, m, acc, c) in [("perturbed", "base", 0.25, [True, False, False, False]),
                                    ("perturbed", "ngd", 0.75, [True, True, True, False]),
                                    ("control", "base", 1.0, [True] * 4), ("control", "ngd", 0.75, [True] * 3 + [False])]}
    for method in S.METHODS:
        cells.setdefault(("perturbed", method), cells["perturbed", "base"])
    records = S.row_records(S.ROWS["qwen3_moe"], cells)
    ngd = next(r for r in records if r["method"] == "ngd")
    assert ngd["delta"] == pytest.approx(50.0) and ngd["control_loss"] == pytest.approx(25.0)
    assert next(r for r in records if r["method"] == "oracle")["control_loss"] is None
    assert "| qwen3_moe | 25.0 / +0.0 |" in S.format_suite_table(records)
    cells["perturbed", "prefix_tuning"] = {"method": "prefix_tuning", "unavailable": "latent attention"}
    records = S.row_records(S.ROWS["deepseek_v2"], cells)
    assert next(r for r in records if r["method"] == "prefix_tuning")["unavailable"] == "latent attention"
    row = S.format_suite_table(records).splitlines()[2].split(" | ")
    assert row[1 + S.METHODS.index("prefix_tuning")] == "n/a"


def test_suite_names():
    assert [r.name for r in S.rows_for("families")] == list(FAMILIES)
    assert {r.build for r in S.rows_for("lower_layer")} == {"lower_layer"}
    assert len(S.rows_for("all")) == len(S.ROWS)
    with pytest.raises(SystemExit, match="unknown 'nope'"):
        S.rows_for("nope")


def test_a_non_olmoe_family_is_repaired_end_to_end(tmp_path):
    """Qwen3-MoE (per-head q/k norms, its own config class) planted at a small size: NGD beats base through
    `c3po build-reference` and `lm_eval --model c3po`."""
    from lm_eval_c3po.demo.planted import build_planted
    from lm_eval_c3po.demo.runs import Bench, run_method

    paths = build_planted(tmp_path / "p", n_ref=96, n_test=48, steps=300, family="qwen3_moe", log=lambda *_: None)
    assert json.loads((paths.perturbed_model / "config.json").read_text())["model_type"] == "qwen3_moe"
    bench = Bench(paths.perturbed_model, paths.task_dir, tmp_path / "work")
    acc = {method: run_method(bench, method, method).acc for method in ("base", "ngd")}
    assert acc["base"] < acc["ngd"], acc


def _suite_out() -> Path:
    return Path(os.environ.get("C3PO_SUITE_OUT", "runs/c3po-demo")).resolve()


# Measured misses (README, "The suite"): the targets stay as the issue set them, and a fixed miss turns the
# strict xfail red, so the README's reading is revisited.
KNOWN_MISSES = {
    "qwen3_moe": "base 61.7 > 60: the faulty mixture still answers 74 of 120 questions",
    "phimoe": "oracle 85.8 < 90: sparsemixer needs the right expert outside the top-2, where omega's gradient "
              "reaches it only through the renormalisation (the outside_topk row's effect)",
    "deepseek_v3": "base 100 > 60: the planted fault does not take in the sigmoid router",
}


@pytest.mark.slow
@pytest.mark.parametrize("family", [
    pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[f])) if f in KNOWN_MISSES else f
    for f in FAMILIES
])
def test_family_meets_the_targets(family):
    """The issue's targets from the suite's own JSON (runs or resumes `c3po demo --suite FAMILY` under
    $C3PO_SUITE_OUT, default runs/c3po-demo, with --limit $C3PO_SUITE_LIMIT if set)."""
    out = _suite_out()
    limit = int(os.environ["C3PO_SUITE_LIMIT"]) if os.environ.get("C3PO_SUITE_LIMIT") else None
    records = [r for r in S.run_suite(family, out, seed=0, limit=limit, log=lambda *_: None) if r["row"] == family]
    ran = [r for r in records if "acc" in r]  # rows the family cannot run (prefix tuning on MLA) say why instead
    acc = {r["method"]: r["acc"] for r in ran}
    loss = {r["method"]: r["control_loss"] for r in ran}
    assert acc["base"] <= 60 and acc["oracle"] >= 90, acc
    assert acc["ngd"] >= acc["base"] + 20, acc
    for method in ("mode_finding", "kernel_regression", "ngd"):
        assert loss[method] <= 2, (method, loss)


def test_config_refuses_impossible_plants():
    from lm_eval_c3po.demo.planted_train import PlantedConfig

    for bad, message in (({"critical_layer": 4}, "outside the 4 MoE layers"),
                         ({"token_offset": 1}, "needs a critical layer below the last"),
                         ({"decoys": 6}, "use 0..5"), ({"fault": "sideways"}, "unknown fault")):
        with pytest.raises(ValueError, match=message):
            PlantedConfig(**bad).validate()
    assert PlantedConfig(family="phimoe").fault_kind == "outside" and PlantedConfig().fault_kind == "inside"
    PlantedConfig(critical_layer=2, token_offset=1, decoys=2).validate()
