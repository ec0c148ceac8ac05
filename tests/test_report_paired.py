"""Paired significance: flips, exact McNemar, paired bootstrap, and the join of two runs by their samples."""

from __future__ import annotations

import csv
import io
import json
import shutil
from math import comb
from pathlib import Path

import numpy as np
import pytest

from lm_eval_c3po.cli import main
from lm_eval_c3po.report import ReportError, write_report
from lm_eval_c3po.report.paired import (
    Flips, bootstrap_delta_interval, combine, count_flips, mcnemar_exact, paired_stats,
)
from lm_eval_c3po.report.paired_table import build_paired_table
from lm_eval_c3po.report.results import load_runs
from lm_eval_c3po.report.samples import join_runs
from lm_eval_c3po.report.table import build_table

PAIRED = Path(__file__).parent / "fixtures" / "report" / "paired"
RUN_DIR = PAIRED / "allenai__OLMoE-1B-7B-0125"
BASE, NGD10 = "2025-07-01T10-00-00.000000", "2025-07-01T11-00-00.000000"


def _exact_mcnemar_by_hand(b: int, c: int) -> float:
    """Two-sided exact binomial test at p = 1/2: twice the smaller tail, capped at 1."""
    n = b + c
    tail = sum(comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def test_flips_of_a_2x2_table_and_the_exact_mcnemar_p():
    # 2x2 table: both right 3, wrong->right 8, right->wrong 2, both wrong 1
    base = [1] * 3 + [0] * 8 + [1] * 2 + [0]
    method = [1] * 3 + [1] * 8 + [0] * 2 + [0]
    flips = count_flips(base, method)
    assert flips == Flips(n=14, wrong_to_right=8, right_to_wrong=2, both_right=3, both_wrong=1)
    assert flips.delta == pytest.approx((11 - 5) / 14)
    # by hand: 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * 56 / 1024
    assert _exact_mcnemar_by_hand(8, 2) == pytest.approx(112 / 1024)
    assert mcnemar_exact(8, 2) == pytest.approx(112 / 1024, abs=1e-12)
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024, abs=1e-12)  # two-sided: symmetric
    for b, c in [(5, 1), (0, 7), (13, 9), (3, 3)]:
        assert mcnemar_exact(b, c) == pytest.approx(_exact_mcnemar_by_hand(b, c), abs=1e-12)


def test_no_discordant_pair_gives_p_one():
    stats = paired_stats([True, False, True], [True, False, True])
    assert stats.p_value == 1.0 and stats.delta == 0.0
    assert (stats.ci_low, stats.ci_high) == (0.0, 0.0)  # every resample has no flip either


def test_bootstrap_interval_covers_the_delta_and_is_seeded():
    rng = np.random.default_rng(7)
    base = rng.random(300) < 0.55
    method = base.copy()
    method[rng.choice(300, 40, replace=False)] = True
    method[rng.choice(300, 10, replace=False)] = False
    one = paired_stats(base, method, seed=3)
    assert one.ci_low <= one.delta <= one.ci_high and one.ci_low < one.ci_high
    assert paired_stats(base, method, seed=3) == one
    # the multinomial draw is the index bootstrap: compare with resampling questions directly
    diff = method.astype(int) - base.astype(int)
    draws = np.random.default_rng(0).integers(0, 300, size=(4000, 300))
    direct = np.percentile(diff[draws].mean(axis=1), [2.5, 97.5])
    np.testing.assert_allclose([one.ci_low, one.ci_high], direct, atol=0.012)


def test_average_is_stratified_and_pools_flips():
    a, b = Flips(10, 4, 1, 3, 2), Flips(4, 0, 2, 1, 1)
    stats = combine([a, b], seed=0, replicates=2000)
    assert stats.delta == pytest.approx((0.3 + -0.5) / 2)
    assert (stats.flips.wrong_to_right, stats.flips.right_to_wrong, stats.flips.n) == (4, 3, 14)
    assert stats.p_value == pytest.approx(_exact_mcnemar_by_hand(4, 3))
    low, high = bootstrap_delta_interval([a, b], seed=0, replicates=2000)
    assert (low, high) == (stats.ci_low, stats.ci_high) and low <= stats.delta <= high


def test_bad_vectors_are_refused():
    with pytest.raises(ValueError, match="aligned"):
        count_flips([1, 0], [1])
    with pytest.raises(ValueError, match="booleans"):
        count_flips([0.5, 1], [1, 1])


# ---------------------------------------------------------------- join by samples


@pytest.fixture(scope="module")
def runs():
    return load_runs([PAIRED])


def test_join_matches_docs_and_concatenates_group_leaves(runs):
    by_name = {r.path.name: r for r in runs}
    base, ngd = by_name[f"results_{BASE}.json"], by_name[f"results_{NGD10}.json"]
    arc = join_runs(base, ngd, "c3po_arc_easy", "acc")
    assert [s.doc_id for s in arc.base] == list(range(12)) == [s.doc_id for s in arc.method]
    assert count_flips(arc.base_correct, arc.method_correct) == Flips(12, 5, 1, 5, 1)
    mmlu = join_runs(base, ngd, "c3po_mmlu_mini", "acc")
    assert [(s.task, s.doc_id) for s in mmlu.base] == [
        *[("c3po_mmlu_mini_humanities", i) for i in range(4)], *[("c3po_mmlu_mini_stem", i) for i in range(4)]
    ]
    # the concatenated leaves reproduce the group's (size-weighted) accuracy in the results JSON
    assert mmlu.method_correct.mean() == ngd.results["c3po_mmlu_mini"]["acc,none"]
    assert arc.method[6].gold_index() == 2 and arc.method[6].context_hashes == (
        __import__("hashlib").sha1(b"Question: Which is a gas?\nAnswer:").hexdigest(),
    )


def test_paired_table_numbers(runs):
    paired = build_paired_table(build_table(runs), runs, seed=0, replicates=2000)
    rows = {(r.method, r.benchmark): r for r in paired.rows}
    arc = rows[("ngd (steps=10)", "c3po_arc_easy")]
    assert (arc.stats.flips.wrong_to_right, arc.stats.flips.right_to_wrong, arc.stats.flips.n) == (5, 1, 12)
    assert arc.stats.p_value == pytest.approx(2 * (1 + 6) / 2**6)
    assert (arc.base_acc, arc.method_acc) == (0.5, 10 / 12)
    avg = rows[("ngd (steps=10)", "average")]
    assert avg.stats.delta == pytest.approx(((10 / 12 - 0.5) + (5 / 8 - 4 / 8)) / 2)
    assert (avg.stats.flips.wrong_to_right, avg.stats.flips.right_to_wrong) == (5 + 2, 1 + 1)
    assert avg.stats.ci_low <= avg.stats.delta <= avg.stats.ci_high
    assert len(paired.rows) == 6  # two ngd rows x (2 benchmarks + average); base is the reference


def test_report_writes_paired_tables_and_cli_prints_them(tmp_path, capsys):
    report = write_report([PAIRED], tmp_path, paired=True)
    assert [p.name for p in report.tables] == ["paired.md", "paired.csv"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "paired.csv").read_text())))
    arc = next(r for r in rows if r["method"] == "ngd (steps=10)" and r["benchmark"] == "c3po_arc_easy")
    assert (arc["wrong_to_right"], arc["right_to_wrong"], arc["n"]) == ("5", "1", "12")
    assert float(arc["mcnemar_p"]) == pytest.approx(14 / 64)
    assert main(["report", str(PAIRED), "--paired"]) == 0
    out = capsys.readouterr().out
    assert "| allenai/OLMoE-1B-7B-0125 | ngd (steps=10) | base | c3po_arc_easy | 12 | 50.00 | 83.33 | +33.33 | 5 | 1 | 0.219 |" in out


def _copy_pair(tmp_path: Path) -> Path:
    """Base and the steps=10 NGD run (results and samples) in a folder of their own."""
    folder = tmp_path / "runs"
    folder.mkdir()
    for path in RUN_DIR.iterdir():
        if BASE in path.name or NGD10 in path.name:
            shutil.copy(path, folder / path.name)
    return folder


def test_run_without_samples_is_refused_naming_the_fix(tmp_path):
    folder = _copy_pair(tmp_path)
    (folder / f"samples_c3po_arc_easy_{BASE}.jsonl").unlink()
    with pytest.raises(ReportError, match=r"no per-question samples for task 'c3po_arc_easy'.*--log_samples"):
        write_report([folder], None, paired=True)
    assert write_report([folder], None).markdown  # the leaderboard alone does not need samples


def test_other_docs_are_refused(tmp_path):
    folder = _copy_pair(tmp_path)
    path = folder / f"samples_c3po_arc_easy_{NGD10}.jsonl"
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")  # the method run lacks doc 11
    with pytest.raises(ReportError, match=r"has 12 docs and .* has 11; 1 doc ids only in the first \(e.g. \[11\]\)"):
        write_report([folder], None, paired=True)
    lines = (RUN_DIR / path.name).read_text().splitlines()
    record = json.loads(lines[4])
    record["doc_hash"] = "0" * 64  # same doc_id, another doc
    lines[4] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=r"doc_id 4: the doc differs .*doc_hash"):
        write_report([folder], None, paired=True)


def test_other_task_versions_are_refused(tmp_path, runs):
    folder = _copy_pair(tmp_path)
    path = folder / f"results_{NGD10}.json"
    data = json.loads(path.read_text())
    data["versions"]["c3po_arc_easy"] = 2.0
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match="task 'c3po_arc_easy' has version 1.0 .* but version 2.0"):
        write_report([folder], None, paired=True)
    by_name = {r.path.name: r for r in runs}
    newer = by_name[f"results_{NGD10}.json"]
    changed = type(newer)(**{**newer.__dict__, "versions": {**newer.versions, "c3po_arc_easy": 2.0}})
    with pytest.raises(ReportError, match="cannot be paired: rerun the older run"):
        join_runs(by_name[f"results_{BASE}.json"], changed, "c3po_arc_easy", "acc")
