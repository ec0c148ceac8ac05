"""``c3po demo``: the planted-pathway benchmark end to end, offline, in minutes.

Every row of the paper's Table 1 through the commands a user runs on a real
checkpoint (see :mod:`lm_eval_c3po.demo.runs`), on a model the project builds
itself. It prints a leaderboard-style table and writes ``c3po report`` output:
the leaderboard, the paired table against base and the pictures of the
paper's Figures 4-6 (cost, coverage, accuracy per NGD step).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lm_eval_c3po.demo.planted import build_planted
from lm_eval_c3po.demo.runs import METHODS, Bench, MethodUnavailable, run_method
from lm_eval_c3po.demo.suite import run_suite
from lm_eval_c3po.report import write_report

# What the demo's NGD runs also record, for the report's accuracy-per-step figure (the paper's Figure 6).
NGD_OPTIONS = {"record_steps": "true"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/c3po-demo", help="working folder (model, data, stores, results)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=("perturbed", "control", "both"), default="both",
                        help="the router with planted faults, the unperturbed control, or both (default)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated rows of the paper's Table 1, from " + ", ".join(METHODS))
    parser.add_argument("--limit", type=int, default=None, help="test questions per run (default: all 240)")
    parser.add_argument("--suite", default=None,
                        help="run the family/variant suite instead: all, families, variants, or comma-separated "
                             "row or build names (see lm_eval_c3po/demo/suite.py); resumable, writes OUT/suite/")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # a 4-layer, 64-wide model: threads cost more than they give
    out = Path(args.out).resolve()
    if args.suite:
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
        bench = Bench(model_dir, paths.task_dir, paths.runs / variant, args.seed, args.limit)
        for method in methods:
            try:
                run = run_method(bench, method, f"{variant}-{method}", **(NGD_OPTIONS if method == "ngd" else {}))
            except MethodUnavailable as why:
                print(f"c3po demo: {variant} {method} skipped: {why}")
                continue
            rows.append({"variant": variant, **run.row()})
            results_files.append(run.results_file)
            diagnostics += sorted((bench.work / "diagnostics").glob(f"{variant}-{method}.jsonl"))
    table = format_table(rows)
    print(table)
    (out / "demo_table.md").write_text(table + "\n")
    (out / "demo_results.json").write_text(json.dumps(rows, indent=2) + "\n")
    report = write_report(results_files, out / "report", diagnostics_paths=diagnostics, paired=True,
                          seed=args.seed)
    if report.paired_markdown:
        print("\n" + report.paired_markdown)
    print(f"\nreport tables and pictures: {out / 'report'} ({len(report.plots)} plots)")
    return 0


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
