"""The leaderboard: numbers straight from the lm-eval results JSONs, delta column, newest-wins, version refusal."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from lm_eval.utils import simple_parse_args_string

from lm_eval_c3po.cli import main
from lm_eval_c3po.report.results import ReportError, load_runs, parse_model_args
from lm_eval_c3po.report.table import build_table, metric_key, to_csv, to_markdown

FIXTURES = Path(__file__).parent / "fixtures" / "report"
RUNS, SWEEP, MISMATCH = FIXTURES / "runs", FIXTURES / "sweep_k", FIXTURES / "version_mismatch"


def _expected_rows() -> dict[tuple[str, str, str], dict]:
    """Independent of the report code: (model, method, other args) -> the newest raw results JSON."""
    newest: dict[tuple[str, str, str], dict] = {}
    for path in sorted([*RUNS.rglob("results_*.json"), *SWEEP.rglob("results_*.json")]):
        data = json.loads(path.read_text())
        args = data["config"]["model_args"]
        args = dict(args) if isinstance(args, dict) else simple_parse_args_string(args)
        model = args.pop("pretrained")
        args.pop("reference", None)  # a store per benchmark: not part of the row
        method = "hf" if data["config"]["model"] == "hf" else str(args.pop("method", "base"))
        key = (model, method, ",".join(f"{k}={v}" for k, v in sorted(args.items())))
        if key not in newest or data["date"] > newest[key]["date"]:
            newest[key] = data
    return newest


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="module")
def table():
    return build_table(load_runs([RUNS, SWEEP]))


def test_csv_cells_equal_the_json_values(table):
    expected = _expected_rows()
    rows = _csv_rows(to_csv(table))
    assert len(rows) == len(expected) == 8
    base_avg = {}
    for row in rows:
        data = expected[(row["model"], row["method"], row["other_args"])]
        values = []
        for task in ("c3po_arc_easy", "c3po_mmlu_mini", "c3po_piqa"):
            assert float(row[task]) == data["results"][task]["acc,none"], (row["label"], task)
            assert float(row[f"{task}_stderr"]) == data["results"][task]["acc_stderr,none"], (row["label"], task)
            values.append(data["results"][task]["acc,none"])
        assert float(row["average"]) == pytest.approx(sum(values) / 3, abs=1e-15)
        if row["method"] in ("base", "hf"):
            base_avg.setdefault((row["model"], row["method"]), float(row["average"]))
    for row in rows:
        ref = "base" if (row["model"], "base") in base_avg else "hf"
        if row["method"] == ref:
            assert row["delta"] == "" and row["delta_vs"] == ""
        else:
            assert row["delta_vs"] == ref
            expected_delta = float(row["average"]) - base_avg[(row["model"], ref)]
            assert float(row["delta"]) == pytest.approx(expected_delta, abs=1e-15)


def test_groups_fold_their_subtasks_and_acc_norm_unfolds_them():
    acc = build_table(load_runs([RUNS]))
    assert acc.columns == ("c3po_arc_easy", "c3po_mmlu_mini", "c3po_piqa")
    # the group aggregates only acc, so for acc_norm its subtasks become the columns
    norm = build_table(load_runs([RUNS]), metric="acc_norm")
    assert norm.columns == ("c3po_arc_easy", "c3po_mmlu_mini_humanities", "c3po_mmlu_mini_stem", "c3po_piqa")
    data = json.loads(next(RUNS.rglob("results_2025-06-02T12*.json")).read_text())
    ngd = next(r for r in _csv_rows(to_csv(norm)) if r["method"] == "ngd" and r["model"].startswith("allenai"))
    assert float(ngd["c3po_mmlu_mini_stem"]) == data["results"]["c3po_mmlu_mini_stem"]["acc_norm,none"]


def test_known_deltas_and_labels(table):
    by_label = {row.label: row for row in table.rows}
    olmoe = "allenai/OLMoE-1B-7B-0125"
    assert by_label[f"{olmoe} / hf"].delta == 0.0  # base reproduces hf exactly in the fixture
    assert by_label[f"{olmoe} / base"].delta is None
    assert by_label[f"{olmoe} / ngd (k=3)"].delta == pytest.approx(0.07664494051871629)
    deepseek = by_label["deepseek-ai/deepseek-moe-16b-base / ngd"]  # no base row: delta against hf
    assert deepseek.delta_vs == "hf" and deepseek.delta == pytest.approx(0.0745004939981363)
    # only the arg that varies between the ngd rows shows in the label; dict model_args parse like strings
    assert [r.method_label for r in table.rows if r.model == olmoe] == [
        "hf", "base", "ngd (k=1)", "ngd (k=3)", "ngd (k=5)", "ngd (k=8)"
    ]


def test_markdown_shows_value_pm_stderr_in_percent(table):
    markdown = to_markdown(table)
    header, rule, *lines = markdown.splitlines()
    assert header == "| Model | Method | c3po_arc_easy | c3po_mmlu_mini | c3po_piqa | Avg acc (%) | Δ vs base |"
    ngd = next(line for line in lines if "| ngd (k=3) |" in line)
    assert "| 84.13 ± 0.75 | 57.33 ± 2.02 | 86.18 ± 0.81 | 75.88 ± 0.77 | +7.66 (vs base) |" in ngd


def test_newest_file_wins_with_a_note(table):
    old, new = "results_2025-06-01T09-30-00.000001.json", "results_2025-06-02T12-00-00.000042.json"
    ngd = next(r for r in table.rows if r.method_label == "ngd (k=3)" and r.model.startswith("allenai"))
    assert {cell.source.name for cell in ngd.cells.values()} == {new}
    (note,) = [n for n in table.notes if "newest wins" in n]
    assert new in note and old in note and note.index(new) < note.index(old)


def test_version_mismatch_is_refused_naming_task_versions_and_files():
    with pytest.raises(ReportError) as err:
        load_runs([RUNS, MISMATCH])
    message = str(err.value)
    assert message.startswith("task 'c3po_arc_easy' has version 1.0 in ")
    assert "but version 2.0 in " in message and "not comparable" in message
    assert str(next(MISMATCH.rglob("*.json"))) in message
    assert "results_2025-06-01T09-30-00.000001.json" in message


def test_cli_prints_the_table_and_reports_errors(capsys):
    assert main(["report", str(RUNS)]) == 0
    assert "| allenai/OLMoE-1B-7B-0125 | ngd | 84.13 ± 0.75 |" in capsys.readouterr().out
    assert main(["report", str(RUNS), str(MISMATCH)]) == 2
    assert "c3po report: error: task 'c3po_arc_easy' has version 1.0" in capsys.readouterr().err


def test_model_args_and_metric_keys():
    assert parse_model_args("pretrained=x,method=ngd,k=3,layers=first:2+last:3") == {
        "pretrained": "x", "method": "ngd", "k": 3, "layers": "first:2+last:3"
    }
    assert parse_model_args({"pretrained": "x", "k": 5}) == {"pretrained": "x", "k": 5}
    entry = {"acc,none": 0.5, "exact_match,strict": 0.1, "exact_match,flexible": 0.2}
    assert metric_key(entry, "acc") == "acc,none"
    assert metric_key(entry, "exact_match,strict") == "exact_match,strict"
    assert metric_key(entry, "acc_norm") is None
    with pytest.raises(ReportError, match="several filters"):
        metric_key(entry, "exact_match")


def test_bad_inputs_say_what_to_do(tmp_path):
    with pytest.raises(ReportError, match="no results_\\*.json under"):
        load_runs([tmp_path])
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"results": {}}))
    with pytest.raises(ReportError, match="no 'config.model'"):
        load_runs([bad])
    with pytest.raises(ReportError, match="no task in the results has metric 'bleu'"):
        build_table(load_runs([RUNS]), metric="bleu")


def test_suite_group_is_shown_as_its_members(tmp_path):
    """`--tasks c3po_six` must give the paper's per-benchmark columns, not one column for the suite."""
    data = json.loads(next(RUNS.rglob("results_2025-06-01T10-00-00.123456.json")).read_text())
    members = ["c3po_arc_easy", "c3po_mmlu_mini", "c3po_piqa"]
    data["results"]["c3po_six"] = {"alias": "c3po_six", "name": "c3po_six", "acc,none": 0.7, "acc_stderr,none": 0.01}
    data["group_subtasks"]["c3po_six"] = members
    data["versions"]["c3po_six"] = "1.0"
    path = tmp_path / "results_2025-06-01T10-00-00.json"
    path.write_text(json.dumps(data))
    assert build_table(load_runs([path])).columns == tuple(members)
    assert build_table(load_runs([path]), suites=()).columns == ("c3po_six",)


def test_runs_with_their_own_reference_store_per_benchmark_are_one_row(tmp_path):
    """The paper gives each benchmark its own store: ngd on ARC (refs/arc) and on PIQA (refs/commonsense)
    is one row with an average, and the stores are named in the notes."""
    data = json.loads(next(RUNS.rglob("results_2025-06-02T12*.json")).read_text())
    for task, store, stamp in (("c3po_arc_easy", "refs/arc", "10"), ("c3po_piqa", "refs/commonsense", "11")):
        one = {**data, "results": {task: data["results"][task]}, "group_subtasks": {}, "versions": {task: 1.0}}
        one["config"] = {**data["config"], "model_args": f"pretrained=m,method=ngd,reference={store},"
                                                         f"diagnostics=diag_{task}.jsonl"}
        one["date"] = float(stamp)
        (tmp_path / f"results_2025-06-02T{stamp}-00-00.000000.json").write_text(json.dumps(one))
    (row,) = build_table(load_runs([tmp_path])).rows
    assert row.args == () and set(row.cells) == {"c3po_arc_easy", "c3po_piqa"} and row.average is not None
    (note,) = build_table(load_runs([tmp_path])).notes
    assert note == "m / ngd reference stores: c3po_arc_easy: refs/arc; c3po_piqa: refs/commonsense"
