"""``write_report``: the one call the demo and the CLI make to turn results into a table and pictures."""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from lm_eval_c3po.report import plots
from lm_eval_c3po.report.diagnostics import group_by_run
from lm_eval_c3po.report.results import ReportError, load_runs
from lm_eval_c3po.report.sweeps import find_sweeps
from lm_eval_c3po.report.table import SUITE_GROUPS, Table, build_table, to_csv, to_markdown


@dataclass(frozen=True)
class ReportFiles:
    """What a report produced: the Markdown table (also written to ``table_md``) and every file written."""

    markdown: str
    table: Table | None
    table_md: Path | None
    table_csv: Path | None
    plots: tuple[Path, ...]


def write_report(
    results_paths: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike | None,
    diagnostics_paths: Iterable[str | os.PathLike] = (),
    metric: str = "acc",
    suites: Collection[str] = SUITE_GROUPS,
) -> ReportFiles:
    """Leaderboard from lm-eval results (files or ``--output_path`` folders) plus plots from diagnostics.

    ``suites`` are groups shown as their members (default: the paper's six-benchmark ``c3po_six``).
    With ``out_dir`` None only the table is built and returned (nothing is written), which is what
    ``c3po report`` without ``--out`` prints. Raises :class:`ReportError` with a fix-it message on bad input.
    """
    results_paths, diagnostics_paths = list(results_paths), list(diagnostics_paths)
    if not results_paths and not diagnostics_paths:
        raise ReportError("nothing to report: give lm-eval results files/folders and/or --diagnostics files")
    if diagnostics_paths and out_dir is None:
        raise ReportError("plots need an output folder: add --out DIR")
    table = build_table(load_runs(results_paths), metric, suites) if results_paths else None
    markdown = to_markdown(table) if table else ""
    if out_dir is None:
        return ReportFiles(markdown, table, None, None, ())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    table_md = table_csv = None
    if table is not None:
        table_md, table_csv = out / "table.md", out / "table.csv"
        table_md.write_text(markdown, encoding="utf-8")
        table_csv.write_text(to_csv(table), encoding="utf-8")
        for sweep in find_sweeps(table):
            stem = plots.slug(f"sweep_{sweep.model}_{sweep.method}_{sweep.param}")
            written += plots.save(plots.sweep_plot(sweep, table.metric, table.percent), out, stem)
    for name, records in group_by_run(diagnostics_paths).items():
        run = plots.slug(name)
        written += plots.save(plots.activation_heatmap(records), out, f"activation_{run}")
        written += plots.save(plots.routing_weights(plots.pick_sample(records)), out, f"routing_{run}")
        if any(r.loss for r in records):
            written += plots.save(plots.loss_curves(records), out, f"loss_{run}")
    return ReportFiles(markdown, table, table_md, table_csv, tuple(written))
