"""The demo's runs, through the commands a user runs: the store, one lm-eval evaluation, the oracle."""

from __future__ import annotations

import time
from pathlib import Path


def build_store(model_dir: Path, task_dir: Path, store: Path, tokens: str = "last") -> Path:
    """``c3po build-reference`` of the planted reference split into ``store`` (kept when it exists), with the
    routing of the token slots ``tokens`` (what the runs on it re-mix)."""
    from lm_eval_c3po.cli import main as c3po

    if not (store / "manifest.json").exists():
        code = c3po(["build-reference", "--model", str(model_dir), "--model_args", "dtype=float32",
                     "--device", "cpu", "--batch_size", "32", "--tasks", "planted_ref",
                     "--include_path", str(task_dir), "--tokens", tokens, "--out", str(store)])
        if code:
            raise SystemExit(f"c3po demo: building the reference store failed (exit {code})")
    return store


def evaluate_method(model_dir, store, task_dir, results_dir: Path, diag: Path, method: str, seed: int,
                    limit: int | None, **options) -> tuple[dict, Path, Path | None, list[bool]]:
    """One ``lm_eval --model c3po`` run on ``planted_test``: its row, results file, diagnostics and per-question
    correctness (in document order). ``options`` are extra ``--model c3po`` options (``layers``, ``tokens``)."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    diag = diag if method != "base" else None
    if diag is not None and diag.exists():
        diag.unlink()
    model_args = f"pretrained={model_dir},dtype=float32,method={method},seed={seed}"
    if method != "base":
        model_args += f",reference={store},diagnostics={diag}"
        model_args += "".join(f",{key}={value}" for key, value in sorted(options.items()))
    start = time.perf_counter()
    results = simple_evaluate(model="c3po", model_args=model_args, tasks=["planted_test"],
                              task_manager=TaskManager(include_path=str(task_dir)), device="cpu", batch_size=32,
                              limit=limit, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              log_samples=True)
    seconds = time.perf_counter() - start
    tracker = EvaluationTracker(output_path=str(results_dir))
    tracker.general_config_tracker.model_name = "c3po"
    tracker.save_results_aggregated(results=results, samples=None)
    (result_file,) = sorted(results_dir.rglob("results_*.json"))[-1:]
    metrics = results["results"]["planted_test"]
    samples = sorted(results["samples"]["planted_test"], key=lambda sample: sample["doc_id"])
    correct = [bool(sample["acc"]) for sample in samples]
    return ({"method": method, "acc": metrics["acc,none"], "stderr": metrics["acc_stderr,none"],
             "n": results["n-samples"]["planted_test"]["effective"], "seconds": round(seconds, 1)},
            result_file, diag, correct)


def oracle_accuracy(lm, docs: list[dict], batch: int = 32, **options) -> float:
    """Accuracy with each question's oracle pathway (NGD on its own gold loss): an upper bound, never a C3PO score.

    ``docs`` hold ``context``, ``choices`` and ``gold``; choices are continuations after a space.
    ``options`` are ``--model c3po`` options (steps, layers, ...).
    """
    correct = oracle_correct(lm, docs, batch, **options)
    return sum(correct) / len(correct)


def oracle_correct(lm, docs: list[dict], batch: int = 32, **options) -> list[bool]:
    """Per question of ``docs``: is it answered right with its oracle pathway (see :func:`oracle_accuracy`)?"""
    from lm_eval_c3po.lm_eval_model import score_with_pathways
    from lm_eval_c3po.remix import C3POConfig, oracle_pathways_by_context
    from lm_eval_c3po.score import Example

    config = C3POConfig.from_model_args(options).resolved_for(lm.routing)
    requests, examples = [], []
    for doc in docs:
        pairs = [((doc["context"], " " + c), *lm._encode_pair(doc["context"], " " + c)) for c in doc["choices"]]
        requests.extend(pairs)
        examples.append(Example(pairs[0][1], [p[2] for p in pairs], int(doc["gold"])))
    pathways = oracle_pathways_by_context(lm.model, lm.routing, config, examples, lm.max_length, batch)
    scores = [r[0] for r in score_with_pathways(lm, requests, pathways, layers=config.layer_ids)]
    correct, cursor = [], 0
    for doc in docs:
        n = len(doc["choices"])
        correct.append(max(range(n), key=lambda i: scores[cursor + i]) == int(doc["gold"]))
        cursor += n
    return correct
