"""``c3po reproduce GRID --model PRETRAINED``: run a grid of lm-eval runs (or print their command lines),
then write every table and figure with ``c3po report``.

Each run goes through ``python -m lm_eval`` in its own process, one after the other, into its own
folder; a run whose folder already holds a ``results_*.json`` is skipped, so rerunning a killed grid
does only the missing runs. ``--print`` instead prints one ``lm_eval`` command line per run, for a
cluster scheduler; ``c3po reproduce ... `` without ``--print`` afterwards skips them all and writes
the report.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lm_eval_c3po.report.api import write_report
from lm_eval_c3po.report.grid import RunSpec, command_line, expand, load_grid, stores_needed
from lm_eval_c3po.report.results import ReportError

# The repository's task configs (the c3po_* benchmarks), when running from a checkout.
REPO_TASK_CONFIGS = Path(__file__).resolve().parents[2] / "task_configs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", metavar="GRID", help="a grid YAML file, or a shipped grid: paper (Table 1 + ablations)")
    parser.add_argument("--model", required=True, metavar="PRETRAINED", help="the MoE checkpoint (pretrained=)")
    parser.add_argument("--model_args", default="", help="more --model c3po args for every run, e.g. dtype=bfloat16")
    parser.add_argument("--reference-dir", default="refs", metavar="DIR",
                        help="folder of the reference stores, one per preset (DIR/arc, DIR/mmlu, ...); default refs")
    parser.add_argument("--output", metavar="DIR", help="where the runs and the report go; default runs/reproduce-GRID")
    parser.add_argument("--include_path", default=str(REPO_TASK_CONFIGS) if REPO_TASK_CONFIGS.is_dir() else None,
                        help="lm-eval --include_path of the task configs (default: this checkout's task_configs/)")
    parser.add_argument("--blocks", default="", help="comma-separated blocks of the grid to run (default: all)")
    parser.add_argument("--tasks", default="", help="comma-separated benchmarks of the grid to run (default: all)")
    parser.add_argument("--lm_eval_args", default="",
                        help="extra lm_eval options for every run, one string: e.g. '--device cuda --batch_size 16'")
    parser.add_argument("--print", action="store_true",
                        help="print one lm_eval command line per run (for a scheduler) instead of running them")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def is_done(run: RunSpec, output: Path) -> bool:
    """A run is done when lm-eval wrote its results JSON (it writes it once the evaluation finished)."""
    return any(run.output_dir(output).rglob("results_*.json"))


def _subprocess(command: Sequence[str]) -> int:
    return subprocess.run(list(command)).returncode


def execute(
    runs: Sequence[RunSpec], commands: Sequence[Sequence[str]], output: Path,
    runner: Callable[[Sequence[str]], int] = _subprocess, log: Callable[[str], None] = print,
) -> list[RunSpec]:
    """Run every not-yet-done run in order; stops at the first failure (a rerun resumes there).
    Returns the runs it ran."""
    ran = []
    for i, (run, command) in enumerate(zip(runs, commands), start=1):
        where = f"[{i}/{len(runs)}] {run.task}/{run.name}"
        if is_done(run, output):
            log(f"{where}: skipped, results exist in {run.output_dir(output)}")
            continue
        log(f"{where}: {command_line(command)}")
        code = runner(command)
        if code != 0:
            raise ReportError(f"{where} failed (exit {code}); fix it and rerun the same command: finished runs are kept")
        ran.append(run)
    return ran


def run(args: argparse.Namespace) -> int:
    def log(message: str) -> None:
        print(f"c3po reproduce: {message}", file=sys.stderr, flush=True)

    try:
        grid = load_grid(args.grid)
        runs = expand(grid, _split(args.blocks), _split(args.tasks))
        output = Path(args.output or f"runs/reproduce-{grid.name}")
        reference_dir = Path(args.reference_dir)
        extra = shlex.split(args.lm_eval_args)
        executable = ("lm_eval",) if args.print else (sys.executable, "-m", "lm_eval")
        commands = [r.command(args.model, output, reference_dir, args.model_args, args.include_path, extra, executable)
                    for r in runs]
        missing = {preset: store for preset, store in stores_needed(runs, reference_dir).items() if not store.is_dir()}
        builds = [f"c3po build-reference --model {args.model} --preset {preset} --out {store}"
                  + (f" --model_args {args.model_args}" if args.model_args else "") for preset, store in missing.items()]
        if args.print:
            for command in commands:
                print(command_line(command))
            if builds:
                log("reference stores missing; build them first:\n  " + "\n  ".join(builds))
            return 0
        if builds:
            raise ReportError("reference stores missing; build them first (or pass --reference-dir):\n  "
                              + "\n  ".join(builds))
        execute(runs, commands, output, log=log)
        diagnostics = [p for r in runs if (p := r.diagnostics_path(output)) is not None and p.is_file()]
        paired = any(r.method == "base" for r in runs)
        report = write_report([output], output / "report", diagnostics, paired=paired)
    except ReportError as err:
        print(f"c3po reproduce: error: {err}", file=sys.stderr)
        return 2
    print(report.markdown)
    if report.paired_markdown:
        print(report.paired_markdown)
    if report.cost_markdown:
        print(report.cost_markdown)
    log(f"report written to {output / 'report'}")
    return 0
