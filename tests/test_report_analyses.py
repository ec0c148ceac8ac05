"""The paper's analyses from diagnostics: expert coverage (Fig. 5), accuracy per NGD step (Fig. 6),
cost per question (Fig. 4) and the wrong->right routing example (Fig. 8), joined with the samples."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from lm_eval_c3po.report import ReportError, write_report
from lm_eval_c3po.report import plots
from lm_eval_c3po.report.analyses import expert_coverage, link_runs, mean_cost, step_accuracy
from lm_eval_c3po.report.diagnostics import group_by_run, load_diagnostics
from lm_eval_c3po.report.results import load_runs

PAIRED = Path(__file__).parent / "fixtures" / "report" / "paired"
DIAG10, DIAG3 = PAIRED / "diagnostics_ngd_s10.jsonl", PAIRED / "diagnostics_ngd_s3.jsonl"
OLD_DIAG = Path(__file__).parent / "fixtures" / "report" / "diagnostics_ngd.jsonl"


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One report over the paired runs and three diagnostics files (drawing is the slow part)."""
    out = tmp_path_factory.mktemp("report")
    return out, write_report([PAIRED], out, [DIAG10, DIAG3, OLD_DIAG])


def _sha1(question: str) -> str:
    return hashlib.sha1(f"Question: {question}\nAnswer:".encode()).hexdigest()


def test_expert_coverage_on_a_constructed_pathway_pair():
    # 6 experts, top-2. Context 1: initial ranking 0,1,2,3,4,5; final top-2 = {2, 5} (ranks 2 and 5).
    # Context 2: initial ranking 5,4,3,2,1,0; final top-2 = {5, 3} (ranks 0 and 2).
    before = np.array([[[0.30, 0.25, 0.20, 0.12, 0.08, 0.05]], [[0.05, 0.08, 0.12, 0.20, 0.25, 0.30]]])
    after = np.array([[[2, 5]], [[5, 3]]])
    coverage = expert_coverage(before, after)
    # n = 2..6 -> context 1 covers 0, 1/2, 1/2, 1/2, 1; context 2 covers 1/2, 1, 1, 1, 1
    np.testing.assert_allclose(coverage, [[0.25, 0.75, 0.75, 0.75, 1.0]])
    # equal initial weights rank by expert id (stable), like the report's top-k everywhere
    np.testing.assert_allclose(expert_coverage(np.full((1, 1, 4), 0.25), np.array([[[1, 3]]])), [[0.5, 0.5, 1.0]])


def test_step_accuracy_and_flips_against_step_zero():
    curve = step_accuracy([[0, 1, 1], [2, 2, 0], [1, 1, 1]], gold=[1, 2, 1])
    assert curve.accuracy == pytest.approx((2 / 3, 1.0, 2 / 3))
    assert curve.wrong_to_right == (0, 1, 1) and curve.right_to_wrong == (0, 0, 1)
    assert step_accuracy([[0, 1, 1], [1]], gold=[1, 1]).accuracy == (0.5,)  # cut to the shortest record


def test_diagnostics_optional_fields_and_their_errors(tmp_path):
    records = load_diagnostics(DIAG10)
    assert records[1].step_predictions == (1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2)
    assert mean_cost(records) == {"own": 100.0, "neighbours": 300.0, "optimisation_forward": 1000.0,
                                  "optimisation_backward": 2000.0, "total": 3400.0}
    assert mean_cost(load_diagnostics(OLD_DIAG)) is None  # absent: no cost output
    line = json.loads(DIAG10.read_text().splitlines()[0])
    for key, bad, message in (("step_predictions", [0, "1"], "list of choice indices"),
                              ("cost", {"own": 1}, "'cost' must give a number for each of own")):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({**line, key: bad}) + "\n")
        with pytest.raises(ReportError, match=message):
            load_diagnostics(path)


def test_diagnostics_link_to_the_run_that_named_them(tmp_path):
    runs = load_runs([PAIRED])
    diagnostics = group_by_run([DIAG10, DIAG3, OLD_DIAG])
    linked = link_runs(diagnostics, runs)
    assert {name: run.args["steps"] for name, run in linked.items()} == {"diagnostics_ngd_s10": 10,
                                                                         "diagnostics_ngd_s3": 3}
    ranked = tmp_path / "diagnostics_ngd_s10_rank0.jsonl"  # a data-parallel run's per-rank file
    ranked.write_text(DIAG10.read_text())
    assert link_runs(group_by_run([ranked]), runs)["diagnostics_ngd_s10_rank0"].args["steps"] == 10


def test_routing_example_is_a_question_turned_wrong_to_right(full):
    tmp_path, report = full
    records = load_diagnostics(DIAG10)
    moved_most, why = plots.pick_sample(records)
    assert moved_most.context_hash == _sha1("Which is a mammal?") and why == plots.MOVED_MOST  # doc 0: right both times
    assert (tmp_path / "routing_diagnostics_ngd_s10.png").is_file()
    # docs 6, 7 (ARC) and 0 (MMLU stem) turned wrong->right; doc 7 moved most of them
    turned = {_sha1("Which is a gas?"), _sha1("What is a star?"), _sha1("What is 2+2?")}
    chosen, why = plots.pick_sample(records, turned)
    assert chosen.context_hash == _sha1("What is a star?") and why == plots.TURNED_RIGHT
    svg = (tmp_path / "routing_diagnostics_ngd_s10.svg").read_text()
    assert "What is a star?" in svg and "wrong to right" in svg
    assert not report.notes


def test_accuracy_per_step_joined_with_the_gold(full):
    tmp_path, _ = full
    rows = list(csv.DictReader(io.StringIO((tmp_path / "steps_diagnostics_ngd_s10.csv").read_text())))
    # gold = doc id mod 4; the fixture's predictions: doc 0 right throughout, ARC doc 5 right until step 4,
    # doc 6 right from step 3, doc 7 from step 6, doc 11 never, MMLU stem doc 0 from step 2
    expected_right = [2, 2, 3, 4, 3, 3, 4, 4, 4, 4, 4]
    assert [float(r["accuracy"]) for r in rows] == pytest.approx([n / 6 for n in expected_right])
    assert [int(r["wrong_to_right"]) for r in rows] == [0, 0, 1, 2, 2, 2, 3, 3, 3, 3, 3]
    assert [int(r["right_to_wrong"]) for r in rows] == [0] * 4 + [1] * 7
    assert not (tmp_path / "steps_diagnostics_ngd_s3.csv").exists()  # no step_predictions: skipped silently
    fig = plots.step_accuracy_plot(
        step_accuracy([[0, 1]], [1]), load_diagnostics(DIAG10)[:1])
    top, bottom = fig.axes
    np.testing.assert_allclose(top.lines[0].get_ydata(), [0.0, 100.0])
    assert bottom.get_xlabel().startswith("NGD step")


def test_coverage_and_cost_outputs(full):
    tmp_path, report = full
    rows = list(csv.DictReader(io.StringIO((tmp_path / "coverage_diagnostics_ngd_s10.csv").read_text())))
    assert [int(r["n"]) for r in rows] == [2, 3, 4, 5, 6] and float(rows[-1]["mean"]) == 1.0
    records = load_diagnostics(DIAG10)
    share_top2 = np.mean([len(set(r.after_topk[0]) & set(r.before_topk[0])) / 2 for r in records])
    assert float(rows[0]["layer_2"]) == pytest.approx(share_top2)  # n = k: overlap of the two top-k sets
    assert (tmp_path / "coverage_diagnostics_ngd_s10.png").is_file()
    cost = list(csv.DictReader(io.StringIO((tmp_path / "cost.csv").read_text())))
    assert [(r["diagnostics"], float(r["total"])) for r in cost] == [("diagnostics_ngd_s10", 3400.0),
                                                                   ("diagnostics_ngd_s3", 1300.0)]
    # accuracy of each linked run: mean of its leaderboard cells (ARC 10/12, MMLU 5/8; ARC 8/12, MMLU 5/8)
    assert float(cost[0]["accuracy"]) == pytest.approx((10 / 12 + 5 / 8) / 2)
    assert float(cost[1]["accuracy"]) == pytest.approx((8 / 12 + 5 / 8) / 2)
    assert "| diagnostics_ngd_s10 | ngd (steps=10) | 6 | 100 | 300 | 1,000 | 2,000 | 3,400 | 72.92 |" \
        in report.cost_markdown
    (ax,) = plots.cost_accuracy_plot([("a", 1300.0, 0.6458), ("b", 3400.0, 0.7292)]).axes
    assert [tuple(line.get_xydata()[0]) for line in ax.lines] == [(1300.0, pytest.approx(64.58)),
                                                                 (3400.0, pytest.approx(72.92))]
    assert (tmp_path / "cost_accuracy.svg").is_file()


def test_diagnostics_without_the_optional_fields_skip_those_outputs(full):
    tmp_path, report = full
    names = {p.name for p in tmp_path.iterdir()}
    assert "coverage_diagnostics_ngd.csv" in names and "steps_diagnostics_ngd.csv" not in names
    cost = list(csv.DictReader(io.StringIO((tmp_path / "cost.csv").read_text())))
    assert "diagnostics_ngd" not in {r["diagnostics"] for r in cost}
