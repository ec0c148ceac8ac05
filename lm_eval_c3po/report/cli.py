"""``c3po report``: leaderboard (Markdown + CSV) from lm-eval results, plots from c3po diagnostics."""

from __future__ import annotations

import argparse
import sys

from lm_eval_c3po.report.api import write_report
from lm_eval_c3po.report.results import ReportError
from lm_eval_c3po.report.table import SUITE_GROUPS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "results", nargs="*", metavar="RESULTS",
        help="lm-eval results JSONs, or folders given to lm_eval --output_path (searched for results_*.json)",
    )
    parser.add_argument("--out", metavar="DIR", help="write table.md, table.csv and the plots (PNG + SVG) here")
    parser.add_argument(
        "--metric", default="acc",
        help="metric of the table cells: acc (default), acc_norm, or METRIC,FILTER such as exact_match,strict-match",
    )
    parser.add_argument(
        "--suite", action="append", default=[], metavar="GROUP",
        help="a group to show as one column per member benchmark instead of one column "
        "(c3po_six always is); repeatable",
    )
    parser.add_argument(
        "--paired", action="store_true",
        help="also print (and write paired.md / paired.csv) each method against the same model's base on the same "
        "questions: flips wrong->right / right->wrong, exact McNemar p, paired-bootstrap 95%% interval of the delta; "
        "needs the runs' --log_samples output",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the paired bootstrap (default 0)")
    parser.add_argument(
        "--diagnostics", nargs="+", default=[], metavar="FILE",
        help="diagnostics JSONL files written by --model c3po, for the activation heatmap, routing, loss, expert "
        "coverage, accuracy-per-step and cost outputs (needs --out); a results file whose model args name the file "
        "(diagnostics=PATH) links it to that run's samples",
    )


def run(args: argparse.Namespace) -> int:
    try:
        report = write_report(
            args.results, args.out, args.diagnostics, metric=args.metric, suites=SUITE_GROUPS | set(args.suite),
            paired=args.paired, seed=args.seed,
        )
    except ReportError as err:
        print(f"c3po report: error: {err}", file=sys.stderr)
        return 2
    if report.markdown:
        print(report.markdown)
    if report.paired_markdown:
        print(report.paired_markdown)
    if report.cost_markdown:
        print(report.cost_markdown)
    for note in report.notes:
        print(f"c3po report: note: {note}", file=sys.stderr)
    for path in (report.table_md, report.table_csv, *report.tables, *report.plots):
        if path is not None:
            print(f"wrote {path}", file=sys.stderr)
    return 0
