"""`c3po reproduce`: the shipped paper grid parses and expands, --print gives one lm_eval line per run,
and a small grid runs end to end through lm-eval, then a rerun does nothing."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lm_eval_c3po.cli import main
from lm_eval_c3po.report import ReportError
from lm_eval_c3po.report.grid import expand, load_grid
from lm_eval_c3po.report.reproduce import execute, is_done
from lm_eval_c3po.report.results import parse_model_args

SIX = ["c3po_mmlu", "c3po_hellaswag", "c3po_arc_challenge", "c3po_arc_easy", "c3po_piqa", "c3po_winogrande"]


def test_paper_grid_covers_table1_and_the_ablations():
    grid = load_grid("paper")
    assert [t for t, _ in grid.tasks] == SIX
    assert dict(grid.tasks)["c3po_arc_challenge"] == "arc" and dict(grid.tasks)["c3po_piqa"] == "piqa"
    assert [b.name for b in grid.blocks] == ["table1", "layers", "tokens", "k", "eps", "steps", "kernels",
                                             "core_experts", "learning_rate"]
    runs = expand(grid)
    arc = [r for r in runs if r.task == "c3po_arc_challenge"]
    assert [r.name for r in arc[:5]] == ["base", "icl", "mode_finding", "kernel_regression", "ngd"]
    # the paper's setting is the Table 1 NGD run, shared by every ablation that contains it
    ngd = next(r for r in arc if r.name == "ngd")
    assert set(ngd.blocks) == {"table1", "layers", "tokens", "k", "steps", "kernels", "core_experts", "learning_rate"}
    assert ngd.args == (("method", "ngd"),) and ngd.diagnostics
    steps = sorted(dict(r.args)["steps"] for r in arc if "steps" in dict(r.args))
    assert steps == [3, 5, 7, 20, 50]  # 10 is the default
    layers = [dict(r.args)["layers"] for r in arc if "layers" in dict(r.args)]
    assert len(layers) == 15 and "first:2+last:3" in layers and "all" in layers
    assert sorted(dict(r.args).get("kernel") for r in arc if "kernel" in dict(r.args)) == ["linear", "matern",
                                                                                           "polynomial"]
    per_task = 5 + 15 + 3 + 2 + 3 + 5 + 3 + 5 + 2  # table1, then each block's non-default points
    assert len(runs) == 6 * per_task


def test_commands_and_print(capsys, tmp_path):
    grid = load_grid("paper")
    (base, icl, *_rest) = expand(grid, blocks=["table1"], tasks=["c3po_arc_easy"])
    command = base.command("m/x", tmp_path, Path("refs"), "dtype=bfloat16", "tc", ["--device", "cuda"])
    assert command == ["lm_eval", "--model", "c3po", "--model_args", "pretrained=m/x,dtype=bfloat16,method=base",
                       "--tasks", "c3po_arc_easy", "--include_path", "tc", "--log_samples", "--output_path",
                       str(tmp_path / "c3po_arc_easy" / "base"), "--device", "cuda"]
    assert "reference=refs/arc" in icl.command("m", tmp_path, Path("refs"))[4]
    assert main(["reproduce", "paper", "--model", "m/x", "--print", "--blocks", "table1,steps",
                 "--reference-dir", str(tmp_path), "--output", "out", "--lm_eval_args", "--batch_size 8"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == len(expand(grid, blocks=["table1", "steps"])) == 6 * (5 + 5)
    for line in lines:
        words = shlex.split(line)
        assert words[:3] == ["lm_eval", "--model", "c3po"] and "--log_samples" in words
        assert words[-2:] == ["--batch_size", "8"]
    ngd_steps = [shlex.split(line) for line in lines if ",steps=3," in line]
    assert len(ngd_steps) == 6 and all("diagnostics=out/" in w[4] for w in ngd_steps)
    assert "c3po build-reference --model m/x --preset arc" in captured.err  # stores are missing under tmp_path


def test_bad_grids_name_the_problem(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("tasks: {t: p}\nblocks: {a: {vary: {k: 3}}}\n")
    with pytest.raises(ReportError, match=r"vary.k must be a non-empty list"):
        load_grid(path)
    path.write_text("tasks: {t: p}\nblocks: {a: {runz: []}}\n")
    with pytest.raises(ReportError, match=r"unknown keys \['runz'\]"):
        load_grid(path)
    with pytest.raises(ReportError, match="no block 'nope'; its blocks: table1"):
        expand(load_grid("paper"), blocks=["nope"])
    with pytest.raises(ReportError, match="shipped grid"):
        load_grid(tmp_path / "missing.yaml")


def test_execute_skips_finished_runs_and_stops_at_a_failure(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("tasks: {t1: p, t2: p}\nblocks: {b: {runs: [{method: base}]}}\n")
    runs = expand(load_grid(path))
    commands = [[r.task] for r in runs]
    calls: list[str] = []

    def runner(command):
        calls.append(command[0])
        if command[0] == "t2":
            return 3
        out = runs[0].output_dir(tmp_path) / "model"
        out.mkdir(parents=True)
        (out / "results_2025-01-01T00-00-00.000000.json").write_text("{}")
        return 0

    with pytest.raises(ReportError, match=r"\[2/2\] t2/base failed \(exit 3\)"):
        execute(runs, commands, tmp_path, runner=runner, log=lambda _: None)
    assert calls == ["t1", "t2"] and is_done(runs[0], tmp_path) and not is_done(runs[1], tmp_path)
    logged: list[str] = []
    with pytest.raises(ReportError):
        execute(runs, commands, tmp_path, runner=runner, log=logged.append)
    assert calls == ["t1", "t2", "t2"] and logged[0].startswith("[1/2] t1/base: skipped, results exist")


@pytest.mark.slow  # two lm_eval processes: about 2-3 minutes on 2 busy CPU cores
def test_small_grid_end_to_end_then_a_rerun_does_nothing(tiny_model_dir, tiny_task_dir, tiny_store_dir, tmp_path,
                                                          capsys):
    grid = tmp_path / "tiny.yaml"
    grid.write_text(
        "name: tiny\ntasks: {tiny_mc: " + tiny_store_dir.name + "}\ndefaults: {steps: 10}\n"
        "blocks:\n  main:\n    diagnostics: true\n    runs: [{method: base}, {method: mode_finding, k: 2}]\n"
    )
    output = tmp_path / "out"
    argv = ["reproduce", str(grid), "--model", str(tiny_model_dir), "--model_args", "dtype=float32",
            "--reference-dir", str(tiny_store_dir.parent), "--output", str(output),
            "--include_path", str(tiny_task_dir), "--lm_eval_args", "--device cpu --batch_size 8"]
    assert main(argv) == 0
    results = sorted(output.rglob("results_*.json"))
    assert [p.relative_to(output).parts[:2] for p in results] == [("tiny_mc", "base"), ("tiny_mc", "mode_finding_k=2")]
    args = parse_model_args(json.loads(results[1].read_text())["config"]["model_args"])
    assert (args["method"], args["k"]) == ("mode_finding", 2)
    assert (output / "tiny_mc" / "mode_finding_k=2" / "diagnostics_tiny_mc_mode_finding_k=2.jsonl").is_file()
    for name in ("table.md", "paired.md", "paired.csv", "coverage_diagnostics_tiny_mc_mode_finding_k_2.csv"):
        assert (output / "report" / name).is_file(), name
    first = capsys.readouterr()
    assert "| tiny_mc | 8 |" in first.out  # the paired table: 8 questions
    stamps = {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file() and "report" not in p.parts}
    assert main(argv) == 0
    second = capsys.readouterr().err
    assert second.count("skipped, results exist") == 2 and "python" not in second.split("report written")[0]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing was rerun


@pytest.mark.slow  # builds a small planted benchmark and store, then two lm_eval processes: 5-20 minutes
def test_planted_grid_end_to_end(tmp_path, capsys):
    """The shipped planted grid on a small planted benchmark (the demo's, at test size): base and NGD."""
    from lm_eval_c3po.demo.planted import build_planted

    paths = build_planted(tmp_path / "planted", n_ref=48, n_test=48, steps=150, log=lambda *_: None)
    store = tmp_path / "refs-perturbed"
    assert main(["build-reference", "--model", str(paths.perturbed_model), "--model_args", "dtype=float32",
                 "--device", "cpu", "--batch_size", "32", "--tasks", "planted_ref",
                 "--include_path", str(paths.task_dir), "--out", str(store)]) == 0
    output = tmp_path / "grid"
    argv = ["reproduce", "planted", "--blocks", "steps", "--model", str(paths.perturbed_model),
            "--model_args", "dtype=float32", "--reference-dir", str(tmp_path), "--output", str(output),
            "--include_path", str(paths.task_dir), "--lm_eval_args", "--device cpu --batch_size 32"]
    assert main(argv) == 0
    assert sorted(p.parent.parent.name for p in output.rglob("results_*.json")) == ["ngd_steps=1", "ngd_steps=3"]
    report = output / "report"
    assert (report / "table.md").is_file() and (report / "coverage_diagnostics_planted_test_ngd_steps_3.csv").is_file()
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().err.count("skipped, results exist") == 2
