"""``c3po demo``: the planted-pathway benchmark end to end, offline, in minutes.

The same commands a user runs on a real checkpoint, on a model the project
builds itself: ``c3po build-reference`` on the reference split, then
``lm_eval --model c3po`` (through lm-eval's ``simple_evaluate``, results
written as lm-eval writes them) for each method, plus the oracle through the
analysis API. It prints a leaderboard-style table and writes ``c3po report``
tables and pictures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lm_eval_c3po.demo.runs import build_store, evaluate_method, oracle_accuracy

METHODS = ("base", "mode_finding", "kernel_regression", "ngd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/c3po-demo", help="working folder (model, data, stores, results)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=("perturbed", "control", "both"), default="both",
                        help="the router with planted faults, the unperturbed control, or both (default)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--no-oracle", dest="oracle", action="store_false", help="skip the oracle upper bound")
    parser.add_argument("--limit", type=int, default=None, help="test questions per run (default: all 240)")
    parser.add_argument("--suite", default=None,
                        help="run the family/variant suite instead: all, families, variants, or comma-separated "
                             "row or build names (see lm_eval_c3po/demo/suite.py); resumable, writes OUT/suite/")


def run(args: argparse.Namespace) -> int:
    from lm_eval_c3po.demo.planted import build_planted

    torch.set_num_threads(1)  # a 4-layer, 64-wide model: threads cost more than they give
    out = Path(args.out).resolve()
    if args.suite:
        from lm_eval_c3po.demo.suite import run_suite

        run_suite(args.suite, out, args.seed, args.limit)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"c3po demo: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    paths = build_planted(out / "planted", seed=args.seed)
    variants = ["perturbed", "control"] if args.variant == "both" else [args.variant]
    rows, results_files, diagnostics = [], [], []
    for variant in variants:
        model_dir = paths.perturbed_model if variant == "perturbed" else paths.control_model
        store = build_store(model_dir, paths.task_dir, out / f"refs-{variant}")
        for method in methods:
            row, result_file, diag = _evaluate(model_dir, store, paths.task_dir, out, variant, method, args)
            rows.append(row)
            results_files.append(result_file)
            if diag:
                diagnostics.append(diag)
        if args.oracle:
            rows.append(_oracle(model_dir, paths.test_jsonl, variant, args.limit))
    table = format_table(rows)
    print(table)
    (out / "demo_table.md").write_text(table + "\n")
    (out / "demo_results.json").write_text(json.dumps(rows, indent=2) + "\n")
    from lm_eval_c3po.report import write_report

    report = write_report(results_files, out / "report", diagnostics_paths=diagnostics)
    print(f"\nreport tables and pictures: {out / 'report'} ({len(report.plots)} plots)")
    return 0


def _evaluate(model_dir, store, task_dir, out: Path, variant: str, method: str, args):
    row, result_file, diag, _ = evaluate_method(model_dir, store, task_dir, out / "results" / f"{variant}-{method}",
                                                out / "diagnostics" / f"{variant}-{method}.jsonl", method,
                                                args.seed, args.limit)
    return {"variant": variant, **row}, result_file, diag


def _oracle(model_dir, test_jsonl: Path, variant: str, limit: int | None) -> dict:
    from lm_eval_c3po.lm_eval_model import C3POLM

    start = time.perf_counter()
    lm = C3POLM(pretrained=str(model_dir), dtype="float32", device="cpu")
    docs = [json.loads(line) for line in test_jsonl.read_text().splitlines()][:limit]
    acc = oracle_accuracy(lm, docs)
    stderr = (acc * (1 - acc) / max(len(docs) - 1, 1)) ** 0.5
    return {"variant": variant, "method": "oracle", "acc": acc, "stderr": stderr, "n": len(docs),
            "seconds": round(time.perf_counter() - start, 1)}


def format_table(rows: list[dict]) -> str:
    """Markdown leaderboard: accuracy ± stderr, change vs the same variant's base, wall time."""
    base = {r["variant"]: r["acc"] for r in rows if r["method"] == "base"}
    lines = ["| variant | method | acc | Δ vs base (points) | n | wall s |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        delta = f"{100 * (r['acc'] - base[r['variant']]):+.1f}" if r["variant"] in base else "–"
        label = f"{r['method']} (upper bound)" if r["method"] == "oracle" else r["method"]
        lines.append(f"| {r['variant']} | {label} | {100 * r['acc']:.1f} ± {100 * r['stderr']:.1f} | {delta} "
                     f"| {r['n']} | {r['seconds']:.1f} |")
    return "\n".join(lines)
