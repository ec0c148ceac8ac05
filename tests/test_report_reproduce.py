"""`c3po reproduce`: the shipped paper grid parses and expands, --print gives one lm_eval line per run,
and a small grid runs end to end through lm-eval, then a rerun does nothing."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lm_eval_c3po.cli import main
from lm_eval_c3po.report import ReportError
from lm_eval_c3po.report.grid import expand, load_grid, store_builds
from lm_eval_c3po.report.reproduce import execute, is_done, plan
from lm_eval_c3po.report.results import parse_model_args

SIX = ["c3po_mmlu", "c3po_hellaswag", "c3po_arc_challenge", "c3po_arc_easy", "c3po_piqa", "c3po_winogrande"]


def test_paper_grid_covers_table1_and_the_ablations():
    grid = load_grid("paper")
    assert [t for t, _ in grid.tasks] == SIX
    assert dict(grid.tasks)["c3po_arc_challenge"] == "arc" and dict(grid.tasks)["c3po_piqa"] == "piqa"
    assert [b.name for b in grid.blocks] == ["table1", "layers", "tokens", "k", "eps", "steps", "kernels",
                                             "core_experts", "learning_rate", "embedders"]
    runs = expand(grid)
    arc = [r for r in runs if r.task == "c3po_arc_challenge"]
    assert [r.name for r in arc[:8]] == ["base", "icl", "prefix_tuning", "soft_prompt", "mode_finding",
                                         "kernel_regression", "ngd", "oracle"]
    # the oracle optimises one context's pathway: WinoGrande's several contexts per doc are skipped
    assert "oracle" not in [r.name for r in runs if r.task == "c3po_winogrande"]
    # the paper's setting is the Table 1 NGD run, shared by every ablation that contains it
    ngd = next(r for r in arc if r.name == "ngd")
    assert set(ngd.blocks) == {"table1", "layers", "tokens", "k", "steps", "kernels", "core_experts", "learning_rate"}
    assert ngd.args == (("method", "ngd"),) and ngd.diagnostics
    steps = sorted(dict(r.args)["steps"] for r in arc if "steps" in dict(r.args))
    assert steps == [3, 5, 7, 20, 50]  # 10 is the default
    layers = [dict(r.args)["layers"] for r in arc if "layers" in dict(r.args)]
    assert len(layers) == 15 and "first:2+last:3" in layers and "all" in layers
    assert [dict(r.args)["tokens"] for r in arc if "tokens" in dict(r.args)] == ["first", "middle", "first:3",
                                                                                  "middle:3", "last:3"]
    assert sorted(dict(r.args).get("kernel") for r in arc if "kernel" in dict(r.args)) == ["linear", "matern",
                                                                                           "polynomial"]
    assert [dict(r.args)["schedule"] for r in arc if "schedule" in dict(r.args)] == ["constant", "constant", "step"]
    assert [r.store_spec.name for r in arc if r.store_spec] == ["nv-embed-v2", "stella-1.5b", "gte-qwen2-7b"]
    per_task = 8 + 15 + 5 + 2 + 3 + 5 + 3 + 5 + 3 + 3  # table1, then each block's non-default points
    assert len(runs) == 6 * per_task - 1  # no oracle on WinoGrande


def test_commands_and_print(capsys, tmp_path):
    grid = load_grid("paper")
    base, icl, prefix, soft, *_rest, oracle = expand(grid, blocks=["table1"], tasks=["c3po_arc_easy"])
    command = base.command("m/x", tmp_path, Path("refs"), "dtype=bfloat16", "tc", ["--device", "cuda"])
    assert command == ["lm_eval", "--model", "c3po", "--model_args", "pretrained=m/x,dtype=bfloat16,method=base",
                       "--tasks", "c3po_arc_easy", "--include_path", "tc", "--log_samples", "--output_path",
                       str(tmp_path / "c3po_arc_easy" / "base"), "--device", "cuda"]
    assert "reference=refs/arc" in icl.command("m", tmp_path, Path("refs"))[4]
    # the trained baselines: one adapter per preset (shared by ARC-Easy and ARC-Challenge), evaluated by --model hf
    adapter = tmp_path / "adapters" / "arc" / "prefix_tuning"
    assert prefix.command("m/x", tmp_path, Path("refs"), "dtype=bfloat16")[:5] == [
        "lm_eval", "--model", "hf", "--model_args", f"pretrained=m/x,dtype=bfloat16,peft={adapter}"]
    assert prefix.train_command("m/x", tmp_path, "dtype=bfloat16", device="cuda", python="py") == [
        "py", "-m", "lm_eval_c3po.cli", "train-baseline", "--model", "m/x", "--model_args", "dtype=bfloat16",
        "--method", "prefix", "--preset", "arc", "--device", "cuda", "--out", str(adapter)]
    assert soft.train_command("m", tmp_path)[soft.train_command("m", tmp_path).index("--method") + 1] == "prompt"
    assert oracle.command("m/x", tmp_path, Path("refs"), "dtype=bfloat16")[:6] == [
        "c3po", "oracle", "--model", "m/x", "--model_args", "dtype=bfloat16"]
    assert main(["reproduce", "paper", "--model", "m/x", "--print", "--blocks", "table1,steps",
                 "--reference-dir", str(tmp_path), "--output", "out", "--lm_eval_args", "--batch_size 8"]) == 0
    captured = capsys.readouterr()
    lines = [shlex.split(line) for line in captured.out.splitlines()]
    evaluations = expand(grid, blocks=["table1", "steps"])
    assert len(evaluations) == 6 * (8 + 5) - 1
    trainings = [w for w in lines if w[:2] == ["c3po", "train-baseline"]]
    assert len(trainings) == 5 * 2  # five presets (the two ARC tasks share one) x prefix / prompt
    assert len(lines) == len(evaluations) + len(trainings)
    for words in lines:
        if words[:2] != ["c3po", "train-baseline"]:
            assert "--log_samples" in words and words[-2:] == ["--batch_size", "8"]
    # every adapter is trained before the first evaluation that reads it
    for train in trainings:
        out = train[train.index("--out") + 1]
        first_use = next(i for i, w in enumerate(lines) if any(f"peft={out}" in word for word in w))
        assert lines.index(train) < first_use
    ngd_steps = [w for w in lines if any(",steps=3," in word for word in w)]
    assert len(ngd_steps) == 6 and all("diagnostics=out/" in w[4] for w in ngd_steps)
    # the token ablation's runs read the same store, which records all their slots
    assert "c3po build-reference --model m/x --preset arc --out" in captured.err
    assert main(["reproduce", "paper", "--model", "m/x", "--print", "--blocks", "tokens", "--tasks", "c3po_piqa",
                 "--reference-dir", str(tmp_path)]) == 0
    assert "--preset piqa --out " + str(tmp_path / "piqa") + " --tokens first:3+middle:3+last:3" in capsys.readouterr().err


def test_store_variants_and_reference_tasks(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(
        "tasks: {t: {store: refs-x, reference_tasks: 'r1,r2'}, u: p}\n"
        "stores: {alt: {build: --embedder E --embedder_args dtype=float16, model_args: {embedder: E}}}\n"
        "blocks: {b: {runs: [{method: ngd, store: alt}, {method: soft_prompt}, {method: oracle, skip_tasks: [u]}]}}\n")
    runs = expand(load_grid(path))
    assert [(r.task, r.name) for r in runs] == [("t", "ngd_store=alt"), ("t", "soft_prompt"), ("t", "oracle"),
                                                ("u", "ngd_store=alt"), ("u", "soft_prompt")]
    alt = runs[0]
    assert alt.command("m", tmp_path, Path("refs"))[4] == "pretrained=m,method=ngd,embedder=E,reference=refs/refs-x-alt"
    assert runs[1].train_command("m", tmp_path)[4:8] == ["--method", "prompt", "--tasks", "r1,r2"]
    builds = store_builds(runs, "m", Path("refs"))
    assert [shlex.join(c) for c in builds.values()] == [
        "c3po build-reference --model m --tasks r1,r2 --out refs/refs-x-alt --embedder E --embedder_args dtype=float16",
        "c3po build-reference --model m --preset p --out refs/p-alt --embedder E --embedder_args dtype=float16"]
    path.write_text("tasks: {t: p}\nblocks: {b: {runs: [{store: nope}]}}\n")
    with pytest.raises(ReportError, match="reads store 'nope', which its 'stores' do not define"):
        expand(load_grid(path))


def test_bad_grids_name_the_problem(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("tasks: {t: p}\nblocks: {a: {vary: {k: 3}}}\n")
    with pytest.raises(ReportError, match=r"vary.k must be a non-empty list"):
        load_grid(path)
    path.write_text("tasks: {t: p}\nblocks: {a: {runz: []}}\n")
    with pytest.raises(ReportError, match=r"unknown keys \['runz'\]"):
        load_grid(path)
    path.write_text("tasks: {t: {store: s}}\nblocks: {a: {runs: [{method: base}]}}\n")
    with pytest.raises(ReportError, match=r"tasks.t must be a preset name or \{store: FOLDER, reference_tasks"):
        load_grid(path)
    with pytest.raises(ReportError, match="no block 'nope'; its blocks: table1"):
        expand(load_grid("paper"), blocks=["nope"])
    with pytest.raises(ReportError, match="shipped grid"):
        load_grid(tmp_path / "missing.yaml")


def test_execute_skips_finished_steps_and_stops_at_a_failure(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("tasks: {t1: p, t2: p}\nblocks: {b: {runs: [{method: base}, {method: prefix_tuning}]}}\n")
    runs = expand(load_grid(path))
    steps = plan(runs, "m", tmp_path, tmp_path)
    assert [s.label for s in steps] == ["t1/base", "adapter adapters/p/prefix_tuning", "t1/prefix_tuning",
                                        "t2/base", "t2/prefix_tuning"]  # one adapter for both tasks' preset
    calls: list[str] = []

    def runner(command):
        label = next(s.label for s in steps if s.command == command)
        calls.append(label)
        if label == "t2/base":
            return 3
        if label.startswith("adapter"):
            (tmp_path / "adapters" / "p" / "prefix_tuning").mkdir(parents=True)
            (tmp_path / "adapters" / "p" / "prefix_tuning" / "adapter_config.json").write_text("{}")
        else:
            out = next(r for r in runs if f"{r.task}/{r.name}" == label).output_dir(tmp_path) / "model"
            out.mkdir(parents=True)
            (out / "results_2025-01-01T00-00-00.000000.json").write_text("{}")
        return 0

    with pytest.raises(ReportError, match=r"\[4/5\] t2/base failed \(exit 3\)"):
        execute(steps, runner=runner, log=lambda _: None)
    assert calls == ["t1/base", "adapter adapters/p/prefix_tuning", "t1/prefix_tuning", "t2/base"]
    assert is_done(runs[0], tmp_path) and not is_done(runs[2], tmp_path)
    logged: list[str] = []
    with pytest.raises(ReportError):
        execute(steps, runner=runner, log=logged.append)
    assert calls[4:] == ["t2/base"] and logged[1].startswith("[2/5] adapter adapters/p/prefix_tuning: skipped")


@pytest.mark.slow  # four evaluations and a training, each its own process: about 3-5 minutes on 2 busy CPU cores
def test_small_grid_end_to_end_then_a_rerun_does_nothing(tiny_model_dir, tiny_task_dir, tiny_store_dir, tmp_path,
                                                          capsys):
    grid = tmp_path / "tiny.yaml"
    grid.write_text(
        "name: tiny\ntasks: {tiny_mc: {store: " + tiny_store_dir.name + ", reference_tasks: tiny_mc}}\n"
        "defaults: {steps: 10}\nblocks:\n  main:\n    diagnostics: true\n"
        "    runs: [{method: base}, {method: mode_finding, k: 2}, {method: soft_prompt, epochs: 1}, {method: oracle}]\n"
    )
    output = tmp_path / "out"
    argv = ["reproduce", str(grid), "--model", str(tiny_model_dir), "--model_args", "dtype=float32",
            "--reference-dir", str(tiny_store_dir.parent), "--output", str(output),
            "--include_path", str(tiny_task_dir), "--lm_eval_args", "--device cpu --batch_size 8"]
    assert main(argv) == 0
    results = sorted(output.rglob("results_*.json"))
    assert [p.relative_to(output).parts[:2] for p in results] == [
        ("tiny_mc", "base"), ("tiny_mc", "mode_finding_k=2"), ("tiny_mc", "oracle"), ("tiny_mc", "soft_prompt_epochs=1")]
    args = parse_model_args(json.loads(results[1].read_text())["config"]["model_args"])
    assert (args["method"], args["k"]) == ("mode_finding", 2)
    assert json.loads(results[2].read_text())["c3po"]["upper_bound"] is True
    adapter = output / "adapters" / tiny_store_dir.name / "soft_prompt_epochs=1"
    assert parse_model_args(json.loads(results[3].read_text())["config"]["model_args"])["peft"] == str(adapter)
    assert json.loads((adapter / "c3po_baseline.json").read_text())["settings"]["epochs"] == 1
    assert (output / "tiny_mc" / "mode_finding_k=2" / "diagnostics_tiny_mc_mode_finding_k=2.jsonl").is_file()
    for name in ("table.md", "paired.md", "paired.csv", "coverage_diagnostics_tiny_mc_mode_finding_k_2.csv"):
        assert (output / "report" / name).is_file(), name
    first = capsys.readouterr()
    assert "| tiny_mc | 8 |" in first.out  # the paired table: 8 questions
    for row in ("soft_prompt", "oracle (upper bound)"):
        assert row in (output / "report" / "table.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file() and "report" not in p.parts}
    assert main(argv) == 0
    second = capsys.readouterr().err
    assert second.count("skipped, results exist") == 5 and "python" not in second.split("report written")[0]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing was rerun


@pytest.mark.slow  # builds a small planted benchmark and store, then two lm_eval processes: 5-20 minutes
def test_planted_grid_end_to_end(tmp_path, capsys):
    """The shipped planted grid on a small planted benchmark (the demo's, at test size): base and NGD."""
    from lm_eval_c3po.demo.planted import build_planted

    paths = build_planted(tmp_path / "planted", n_ref=48, n_test=48, steps=150, log=lambda *_: None)
    store = tmp_path / "refs-last"
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
