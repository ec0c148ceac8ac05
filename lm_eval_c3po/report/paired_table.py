"""The paired table: every method row against the same model's base row, question by question.

For each leaderboard row with a reference row (its ``Δ vs base``), per benchmark column and for
the average over the columns: n, both accuracies, the delta, flips wrong->right / right->wrong,
the exact McNemar p-value and the seeded paired-bootstrap 95% interval of the delta
(:mod:`lm_eval_c3po.report.paired`). Each cell is joined through the results file the leaderboard
took it from (newest wins there, so here too) and that file's ``--log_samples`` output.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lm_eval_c3po.report.paired import DEFAULT_REPLICATES, DEFAULT_SEED, PairedStats, combine, count_flips
from lm_eval_c3po.report.results import ReportError, Run
from lm_eval_c3po.report.samples import Joined, join_runs
from lm_eval_c3po.report.table import Row, Table

AVERAGE = "average"


@dataclass(frozen=True)
class PairedRow:
    """One method row against its base row on one benchmark (or ``average``: accuracies are then the
    unweighted means over the benchmarks, like the leaderboard's Avg)."""

    model: str
    method: str
    versus: str
    benchmark: str
    stats: PairedStats
    base_acc: float
    method_acc: float


@dataclass(frozen=True)
class PairedTable:
    metric: str
    rows: tuple[PairedRow, ...]
    joins: dict[tuple[Path, Path, str], Joined]
    notes: tuple[str, ...]
    seed: int
    replicates: int


def build_paired_table(
    table: Table, runs: Sequence[Run], seed: int = DEFAULT_SEED, replicates: int = DEFAULT_REPLICATES
) -> PairedTable:
    """Join every compared cell through its samples; refuses (ReportError) what cannot be paired."""
    by_path = {run.path: run for run in runs}
    by_key = {(row.model, row.method, row.args): row for row in table.rows}
    cache: dict = {}
    joins: dict[tuple[Path, Path, str], Joined] = {}
    out: list[PairedRow] = []
    notes: list[str] = []
    for row in table.rows:
        if row.reference_key is None:
            continue
        base: Row = by_key[row.reference_key]
        versus = base.method_label
        columns = [c for c in table.columns if c in row.cells and c in base.cells]
        strata = []
        for column in columns:
            base_run, method_run = by_path[base.cells[column].source], by_path[row.cells[column].source]
            joined = join_runs(base_run, method_run, column, table.metric, cache)
            joins[(base_run.path, method_run.path, column)] = joined
            flips = count_flips(joined.base_correct, joined.method_correct)
            strata.append(flips)
            out.append(PairedRow(row.model, row.method_label, versus, column,
                                 combine([flips], seed=seed, replicates=replicates),
                                 flips.base_correct / flips.n, flips.method_correct / flips.n))
        if columns and len(columns) == len(table.columns) and len(columns) > 1:
            out.append(PairedRow(row.model, row.method_label, versus, AVERAGE,
                                 combine(strata, seed=seed, replicates=replicates),
                                 sum(f.base_correct / f.n for f in strata) / len(strata),
                                 sum(f.method_correct / f.n for f in strata) / len(strata)))
        elif len(columns) < len(table.columns):
            missing = [c for c in table.columns if c not in columns]
            notes.append(f"{row.label} vs {versus}: no paired average (no pair on {', '.join(missing)})")
    if not out:
        raise ReportError(
            "nothing to pair: the paired table compares each method row with the same model's base (or hf) row; "
            "give both runs' results folders"
        )
    return PairedTable(table.metric, tuple(out), joins, tuple(notes), seed, replicates)


def _p(value: float) -> str:
    return f"{value:.1e}" if value < 1e-3 else f"{value:.3f}"


def to_markdown(paired: PairedTable) -> str:
    """One line per method x benchmark, deltas and interval in points."""
    header = ["Model", "Method", "vs", "Benchmark", "n", f"base {paired.metric} (%)", f"method {paired.metric} (%)",
              "Δ (points)", "w→r", "r→w", "McNemar p", "95% CI of Δ"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] * 4 + ["---:"] * 8) + "|"]
    for row in paired.rows:
        s = row.stats
        values = [row.model, row.method, row.versus, row.benchmark, str(s.flips.n), f"{100 * row.base_acc:.2f}",
                  f"{100 * row.method_acc:.2f}", f"{100 * s.delta:+.2f}", str(s.flips.wrong_to_right),
                  str(s.flips.right_to_wrong), _p(s.p_value), f"[{100 * s.ci_low:+.2f}, {100 * s.ci_high:+.2f}]"]
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in values) + " |")
    notes = [
        "Paired over the same questions (lm-eval --log_samples, matched by doc_id and doc_hash). w→r / r→w: "
        "questions the method turns from wrong to right / right to wrong. McNemar p: exact two-sided binomial "
        "test on those discordant pairs. 95% CI: percentile interval of the paired bootstrap "
        f"({paired.replicates} replicates, seed {paired.seed}).",
        *([f"{AVERAGE}: Δ and CI of the unweighted mean over the benchmarks (each resampled on its own); n, flips "
           "and McNemar p pooled over all their questions."] if any(r.benchmark == AVERAGE for r in paired.rows) else []),
        *paired.notes,
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def to_csv(paired: PairedTable) -> str:
    """Raw numbers (fractions) at full precision."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model", "method", "versus", "benchmark", "n", "base_acc", "method_acc", "delta",
                     "wrong_to_right", "right_to_wrong", "mcnemar_p", "ci_low", "ci_high"])
    for row in paired.rows:
        s = row.stats
        writer.writerow([row.model, row.method, row.versus, row.benchmark, s.flips.n, repr(row.base_acc),
                         repr(row.method_acc), repr(s.delta), s.flips.wrong_to_right, s.flips.right_to_wrong,
                         repr(s.p_value), repr(s.ci_low), repr(s.ci_high)])
    return out.getvalue()
