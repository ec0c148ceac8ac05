"""``c3po reproduce GRID --model PRETRAINED``: run a grid of lm-eval runs (or print their command lines),
then write every table and figure with ``c3po report``.

Each run goes through its own process (``python -m lm_eval``, or ``c3po oracle`` for the upper bound),
one after the other, into its own folder; the trained baselines' adapters are trained first (``c3po
train-baseline``, once per preset). A run whose folder already holds a ``results_*.json``, or an adapter
already written, is skipped, so rerunning a killed grid does only the missing steps. ``--print`` instead
prints one command line per step, for a cluster scheduler (each adapter's training before the
evaluations that read it); ``c3po reproduce ...`` without ``--print`` afterwards skips them all and
writes the report.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from lm_eval_c3po.report.api import write_report
from lm_eval_c3po.report.grid import (
    RunSpec,
    command_line,
    expand,
    load_grid,
    store_builds,
)
from lm_eval_c3po.report.results import ReportError

# The repository's task configs (the c3po_* benchmarks), when running from a checkout.
REPO_TASK_CONFIGS = Path(__file__).resolve().parents[2] / "task_configs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", metavar="GRID", help="a grid YAML file, or a shipped grid: paper (Table 1 + ablations)")
    parser.add_argument("--model", required=True, metavar="PRETRAINED", help="the MoE checkpoint (pretrained=)")
    parser.add_argument("--model_args", default="",
                        help="more model args for every run, e.g. dtype=bfloat16 (also given to --model hf for the "
                             "trained baselines and to c3po train-baseline, so keep c3po settings in the grid)")
    parser.add_argument("--reference-dir", default="refs", metavar="DIR",
                        help="folder of the reference stores, one per preset (DIR/arc, DIR/mmlu, ...); default refs")
    parser.add_argument("--output", metavar="DIR", help="where the runs and the report go; default runs/reproduce-GRID")
    parser.add_argument("--include_path", default=str(REPO_TASK_CONFIGS) if REPO_TASK_CONFIGS.is_dir() else None,
                        help="lm-eval --include_path of the task configs (default: this checkout's task_configs/)")
    parser.add_argument("--blocks", default="", help="comma-separated blocks of the grid to run (default: all)")
    parser.add_argument("--tasks", default="", help="comma-separated benchmarks of the grid to run (default: all)")
    parser.add_argument("--lm_eval_args", default="",
                        help="extra lm_eval options for every evaluation, one string: e.g. '--device cuda "
                             "--batch_size 16' (its --device also goes to c3po train-baseline)")
    parser.add_argument("--print", action="store_true",
                        help="print one command line per step (adapter trainings first, then the evaluations) for a "
                             "scheduler, instead of running them")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def is_done(run: RunSpec, output: Path) -> bool:
    """A run is done when lm-eval wrote its results JSON (it writes it once the evaluation finished)."""
    return any(run.output_dir(output).rglob("results_*.json"))


def adapter_done(adapter: Path) -> bool:
    """``c3po train-baseline`` swaps the adapter folder in whole when training has finished."""
    return (adapter / "adapter_config.json").is_file()


@dataclass(frozen=True)
class Step:
    """One command of a grid: an adapter training or an evaluation; ``done`` says whether its output exists."""

    label: str
    command: list[str]
    done: Callable[[], bool]


def plan(runs: Sequence[RunSpec], pretrained: str, output: Path, reference_dir: Path, model_args: str = "",
         include_path: str | None = None, extra: Sequence[str] = (), python: str | None = None) -> list[Step]:
    """The steps of ``runs`` in order: each adapter's training (once per preset and setting) before the first
    evaluation that reads it."""
    device = _option(extra, "--device")
    steps: list[Step] = []
    trained: set[Path] = set()
    for run in runs:
        adapter = run.adapter_dir(output)
        if adapter is not None and adapter not in trained:
            trained.add(adapter)
            steps.append(Step(f"adapter {adapter.relative_to(output)}",
                              run.train_command(pretrained, output, model_args, include_path, device, python),
                              partial(adapter_done, adapter)))
        steps.append(Step(f"{run.task}/{run.name}",
                          run.command(pretrained, output, reference_dir, model_args, include_path, extra, python),
                          partial(is_done, run, output)))
    return steps


def _option(words: Sequence[str], name: str) -> str | None:
    """The value of ``name`` in an argv list (``--device cuda`` or ``--device=cuda``), or None."""
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def _subprocess(command: Sequence[str]) -> int:
    return subprocess.run(list(command)).returncode


def execute(steps: Sequence[Step], runner: Callable[[Sequence[str]], int] = _subprocess,
            log: Callable[[str], None] = print) -> list[Step]:
    """Run every step whose output does not exist yet, in order; stops at the first failure (a rerun resumes
    there). Returns the steps it ran."""
    ran = []
    for i, step in enumerate(steps, start=1):
        where = f"[{i}/{len(steps)}] {step.label}"
        if step.done():
            log(f"{where}: skipped, results exist")
            continue
        log(f"{where}: {command_line(step.command)}")
        code = runner(step.command)
        if code != 0:
            raise ReportError(f"{where} failed (exit {code}); fix it and rerun the same command: finished runs are kept")
        ran.append(step)
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
        python = None if args.print else sys.executable
        steps = plan(runs, args.model, output, reference_dir, args.model_args, args.include_path, extra, python)
        builds = [command_line(command) for store, command in
                  store_builds(runs, args.model, reference_dir, args.model_args).items() if not store.is_dir()]
        if args.print:
            for step in steps:
                print(command_line(step.command))
            if builds:
                log("reference stores missing; build them first:\n  " + "\n  ".join(builds))
            return 0
        if builds:
            raise ReportError("reference stores missing; build them first (or pass --reference-dir):\n  "
                              + "\n  ".join(builds))
        execute(steps, log=log)
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
