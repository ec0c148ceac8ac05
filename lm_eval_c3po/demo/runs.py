"""The demo's runs, through the commands a user runs: one per row of the paper's Table 1.

Every row ends as an lm-eval results file with its ``--log_samples`` output, so
``c3po report`` lays out the table and its paired statistics from the files
alone: ``--model c3po`` for base, ICL and the three re-mixing methods;
``c3po train-baseline`` then ``--model hf`` with ``peft=`` for prefix tuning
and the soft prompt; ``c3po oracle`` for the upper bound.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from lm_eval_c3po import oracle_eval
from lm_eval_c3po.baselines import cli as baseline_cli
from lm_eval_c3po.baselines.train import TrainError
from lm_eval_c3po.report.results import load_run
from lm_eval_c3po.report.samples import load_samples
from reference_builders import cli as builder_cli

TASK = "planted_test"
METHODS = ("base", "icl", "prefix_tuning", "soft_prompt", "mode_finding", "kernel_regression", "ngd", "oracle")
ADAPTERS = {"prefix_tuning": "prefix", "soft_prompt": "prompt"}  # Table 1 row -> c3po train-baseline --method
REMIX_METHODS = ("mode_finding", "kernel_regression", "ngd")  # the rows a layer or token spec changes


class MethodUnavailable(RuntimeError):
    """A row that cannot run on this model (e.g. prefix tuning on multi-head latent attention); says why."""


@dataclass(frozen=True)
class Bench:
    """One planted model and the folder its stores, adapters, results and diagnostics go to."""

    model_dir: Path
    task_dir: Path
    work: Path
    seed: int = 0
    limit: int | None = None
    tokens: str = "last"  # the token slots the reference store records


@dataclass(frozen=True)
class Evaluation:
    """One run's accuracy, its lm-eval results file and per-question correctness (document order)."""

    method: str
    acc: float
    stderr: float
    n: int
    seconds: float
    results_file: Path
    correct: tuple[bool, ...]

    def row(self) -> dict:
        return {"method": self.method, "acc": self.acc, "stderr": self.stderr, "n": self.n,
                "seconds": round(self.seconds, 1)}


def run_method(bench: Bench, method: str, tag: str, **options) -> Evaluation:
    """Evaluate one Table 1 row on ``bench``; ``options`` are extra ``--model c3po`` options (layers, tokens,
    record_steps, ...) for the methods that read them. Raises :class:`MethodUnavailable` with the reason."""
    results_dir = bench.work / "results" / tag
    if method == "oracle":
        return evaluate_oracle(bench, results_dir, **options)
    if method in ADAPTERS:
        adapter = train_adapter(bench, ADAPTERS[method])
        return evaluate(bench, method, "hf", f"pretrained={bench.model_dir},dtype=float32,peft={adapter}",
                        results_dir)
    model_args = f"pretrained={bench.model_dir},dtype=float32,method={method},seed={bench.seed}"
    if method != "base":
        model_args += f",reference={build_store(bench)}"
    if method in REMIX_METHODS:
        diag = bench.work / "diagnostics" / f"{tag}.jsonl"
        diag.unlink(missing_ok=True)
        model_args += f",diagnostics={diag}" + "".join(f",{key}={value}" for key, value in sorted(options.items()))
    return evaluate(bench, method, "c3po", model_args, results_dir)


def build_store(bench: Bench) -> Path:
    """``c3po build-reference`` of the planted reference split (kept when it exists), recording the token slots
    ``bench.tokens`` (what the runs on it re-mix)."""
    store = bench.work / f"refs-{bench.tokens.replace(':', '-')}"
    if not (store / "manifest.json").exists():
        code = builder_cli.run(_parse(builder_cli, [
            "--model", str(bench.model_dir), "--model_args", "dtype=float32", "--device", "cpu", "--batch_size", "32",
            "--tasks", "planted_ref", "--include_path", str(bench.task_dir), "--tokens", bench.tokens,
            "--out", str(store)]))
        if code:
            raise SystemExit(f"c3po demo: building the reference store failed (exit {code})")
    return store


def train_adapter(bench: Bench, kind: str) -> Path:
    """``c3po train-baseline --method kind`` on the planted reference split (kept when it exists)."""
    adapter = bench.work / "adapters" / kind
    if not (adapter / "adapter_config.json").exists():
        args = _parse(baseline_cli, [
            "--model", str(bench.model_dir), "--model_args", "dtype=float32", "--device", "cpu", "--method", kind,
            "--tasks", "planted_ref", "--include_path", str(bench.task_dir), "--seed", str(bench.seed),
            "--out", str(adapter)])
        try:
            baseline_cli.train(args)  # not run(): its TrainError says why a family cannot take the adapter
        except TrainError as err:
            raise MethodUnavailable(str(err)) from err
    return adapter


def evaluate(bench: Bench, method: str, model: str, model_args: str, results_dir: Path) -> Evaluation:
    """One lm-eval run on ``planted_test``, written as ``lm_eval --output_path --log_samples`` writes it."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    seed = bench.seed
    results = simple_evaluate(model=model, model_args=model_args, tasks=[TASK],
                              task_manager=TaskManager(include_path=str(bench.task_dir)), device="cpu", batch_size=32,
                              limit=bench.limit, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              log_samples=True)
    seconds = time.perf_counter() - start
    _save(results, results_dir, model)
    return read_evaluation(method, results_dir, seconds)


def evaluate_oracle(bench: Bench, results_dir: Path, **options) -> Evaluation:
    """``c3po oracle`` on ``planted_test``: an lm-eval results file marked as an upper bound."""
    model_args = ",".join(["dtype=float32", *(f"{key}={value}" for key, value in sorted(options.items()))])
    argv = ["--model", str(bench.model_dir), "--model_args", model_args, "--tasks", TASK,
            "--include_path", str(bench.task_dir), "--output_path", str(results_dir), "--log_samples",
            "--device", "cpu", "--batch_size", "32"]
    if bench.limit is not None:
        argv += ["--limit", str(bench.limit)]
    start = time.perf_counter()
    if oracle_eval.run(_parse(oracle_eval, argv)):
        raise SystemExit("c3po demo: the oracle run failed (see above)")
    return read_evaluation("oracle", results_dir, time.perf_counter() - start)


def _parse(command: ModuleType, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed as the ``c3po`` subcommand ``command`` (a module with ``add_arguments``) parses it."""
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def _save(results: dict, results_dir: Path, model_name: str) -> None:
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(results_dir))
    tracker.general_config_tracker.model_name = model_name
    tracker.save_results_aggregated(results=results, samples=results["samples"])
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=results["samples"][task])


def read_evaluation(method: str, results_dir: Path, seconds: float) -> Evaluation:
    """The newest results file under ``results_dir`` and its samples' per-question correctness (as the report reads
    them)."""
    run = load_run(max(results_dir.rglob("results_*.json"), key=lambda path: path.name))
    samples = load_samples(run, TASK, "acc")
    correct = tuple(samples[doc_id].correct for doc_id in sorted(samples))
    acc = sum(correct) / len(correct)
    stderr = math.sqrt(acc * (1 - acc) / max(len(correct) - 1, 1))  # lm-eval's acc_stderr for a 0/1 mean
    return Evaluation(method, acc, stderr, len(correct), seconds, run.path, correct)
