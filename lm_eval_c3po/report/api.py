"""``write_report``: the one call the demo and the CLI make to turn results into a table and pictures."""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from lm_eval_c3po.report import figures, paired_table, plots
from lm_eval_c3po.report.diagnostics import group_by_run
from lm_eval_c3po.report.results import ReportError, load_runs
from lm_eval_c3po.report.sweeps import find_sweeps
from lm_eval_c3po.report.table import SUITE_GROUPS, Table, build_table, to_csv, to_markdown
from lm_eval_c3po.store._fs import atomic_write


@dataclass(frozen=True)
class ReportFiles:
    """What a report produced: the Markdown table (also written to ``table_md``) and every file written."""

    markdown: str
    table: Table | None
    table_md: Path | None
    table_csv: Path | None
    plots: tuple[Path, ...]
    paired: paired_table.PairedTable | None = None
    paired_markdown: str = ""
    tables: tuple[Path, ...] = ()
    cost_markdown: str = ""
    notes: tuple[str, ...] = ()


def write_text(path: Path, text: str) -> None:
    """Tables are written atomically: a killed report never leaves half a table behind."""
    atomic_write(path, text.encode("utf-8"))


def write_report(
    results_paths: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike | None,
    diagnostics_paths: Iterable[str | os.PathLike] = (),
    metric: str = "acc",
    suites: Collection[str] = SUITE_GROUPS,
    paired: bool = False,
    seed: int = paired_table.DEFAULT_SEED,
) -> ReportFiles:
    """Leaderboard from lm-eval results (files or ``--output_path`` folders) plus plots from diagnostics.

    ``suites`` are groups shown as their members (default: the paper's six-benchmark ``c3po_six``).
    ``paired`` adds the paired table (flips, McNemar p, bootstrap interval with ``seed``) of every method
    row against its base row; it needs every compared run's ``--log_samples`` output.
    With ``out_dir`` None only the table is built and returned (nothing is written), which is what
    ``c3po report`` without ``--out`` prints. Raises :class:`ReportError` with a fix-it message on bad input.
    """
    results_paths, diagnostics_paths = list(results_paths), list(diagnostics_paths)
    if not results_paths and not diagnostics_paths:
        raise ReportError("nothing to report: give lm-eval results files/folders and/or --diagnostics files")
    if diagnostics_paths and out_dir is None:
        raise ReportError("plots need an output folder: add --out DIR")
    runs = load_runs(results_paths) if results_paths else []
    table = build_table(runs, metric, suites) if runs else None
    markdown = to_markdown(table) if table else ""
    if paired and table is None:
        raise ReportError("the paired table needs lm-eval results: give the results folders of base and method runs")
    pairs = paired_table.build_paired_table(table, runs, seed=seed) if paired and table is not None else None
    paired_markdown = paired_table.to_markdown(pairs) if pairs else ""
    if out_dir is None:
        return ReportFiles(markdown, table, None, None, (), pairs, paired_markdown)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    table_md = table_csv = None
    if table is not None:
        table_md, table_csv = out / "table.md", out / "table.csv"
        write_text(table_md, markdown)
        write_text(table_csv, to_csv(table))
    tables: list[Path] = []
    if pairs is not None:
        tables += [out / "paired.md", out / "paired.csv"]
        write_text(tables[0], paired_markdown)
        write_text(tables[1], paired_table.to_csv(pairs))
    if table is not None:
        for sweep in find_sweeps(table):
            stem = plots.slug(f"sweep_{sweep.model}_{sweep.method}_{sweep.param}")
            written += plots.save(plots.sweep_plot(sweep, table.metric, table.percent), out, stem)
    drawn = figures.draw(group_by_run(diagnostics_paths), runs, table, out, write_text)
    written += [p for p in drawn.files if p.suffix in (".png", ".svg")]
    tables += [p for p in drawn.files if p.suffix not in (".png", ".svg")]
    return ReportFiles(markdown, table, table_md, table_csv, tuple(written), pairs, paired_markdown, tuple(tables),
                       drawn.cost_markdown, drawn.notes)
