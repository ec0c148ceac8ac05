"""Every picture and small table drawn from diagnostics runs, joined with their lm-eval run's samples.

Per diagnostics run: the activation heatmap, one context's routing weights (Figure 8: a question
turned wrong->right when the samples say which), the surrogate loss, expert coverage (Figure 5,
CSV + plot), accuracy per NGD step (Figure 6, CSV + plot, when records carry ``step_predictions``
and the run's samples give the gold); across runs: mean cost per question (Figure 4, Markdown +
CSV, and accuracy vs cost when the runs are linked to results). What needs a missing optional
field is skipped silently; what needs samples that are missing is skipped with a note.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lm_eval_c3po.report import plots
from lm_eval_c3po.report.analyses import coverage_of_records, link_runs, mean_cost, step_accuracy
from lm_eval_c3po.report.diagnostics import COST_PARTS, ContextDiagnostics
from lm_eval_c3po.report.results import ReportError, Run
from lm_eval_c3po.report.samples import Sample, join_runs, load_samples
from lm_eval_c3po.report.table import Row, Table


@dataclass(frozen=True)
class FigureOutput:
    files: tuple[Path, ...]
    cost_markdown: str
    notes: tuple[str, ...]


def _csv(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def _samples_by_context(run: Run, cache: dict, notes: list[str]) -> dict[str, Sample]:
    """Context hash -> sample of every leaf task of ``run`` (single-context docs: one prediction each)."""
    found: dict[str, Sample] = {}
    for task in run.results:
        if run.group_subtasks.get(task):
            continue
        try:
            samples = load_samples(run, task, "acc", cache)
        except ReportError as err:
            notes.append(f"{run.path}: {err}")
            continue
        for sample in samples.values():
            if len(sample.contexts) == 1:
                found[sample.context_hashes[0]] = sample
    return found


def _row_of(run: Run, table: Table) -> Row | None:
    """The leaderboard row that holds ``run``'s cells."""
    return next((r for r in table.rows if any(c.source == run.path for c in r.cells.values())), None)


def _wrong_to_right(run: Run, table: Table, by_path: Mapping[Path, Run], cache: dict, notes: list[str]) -> set[str]:
    """Context hashes of the questions ``run`` turned from wrong to right against its base row."""
    row = _row_of(run, table)
    if row is None or row.reference_key is None:
        return set()
    base = next(r for r in table.rows if (r.model, r.method, r.args) == row.reference_key)
    turned: set[str] = set()
    for column, cell in row.cells.items():
        if cell.source != run.path or column not in base.cells:
            continue
        try:
            joined = join_runs(by_path[base.cells[column].source], run, column, table.metric, cache)
        except ReportError as err:
            notes.append(f"routing example of {run.path}: {err}")
            continue
        for before, after in zip(joined.base, joined.method):
            if not before.correct and after.correct:
                turned.update(after.context_hashes)
    return turned


def _run_accuracy(run: Run, table: Table) -> float | None:
    """The run's own cells of the leaderboard, averaged (its accuracy on the questions it answered)."""
    values = [c.value for r in table.rows for c in r.cells.values() if c.source == run.path]
    return sum(values) / len(values) if values else None


def draw(
    diagnostics: Mapping[str, Sequence[ContextDiagnostics]], runs: Sequence[Run], table: Table | None,
    out: Path, write_text: Callable[[Path, str], None],
) -> FigureOutput:
    """Draw and write everything for the diagnostics runs; returns the files, cost table and notes."""
    linked = link_runs(diagnostics, runs)
    by_path = {run.path: run for run in runs}
    cache: dict = {}
    notes: list[str] = []
    files: list[Path] = []
    cost_rows: list[tuple[str, str, int, dict[str, float], float | None]] = []
    for name, records in diagnostics.items():
        stem = plots.slug(name)
        run = linked.get(name)
        files += plots.save(plots.activation_heatmap(records), out, f"activation_{stem}")
        turned = _wrong_to_right(run, table, by_path, cache, notes) if run is not None and table is not None else set()
        record, why = plots.pick_sample(records, turned)
        files += plots.save(plots.routing_weights(record, why), out, f"routing_{stem}")
        if any(r.loss for r in records):
            files += plots.save(plots.loss_curves(records), out, f"loss_{stem}")
        ns, coverage = coverage_of_records(records)
        layers = [f"layer_{layer}" for layer in records[0].critical_layers]
        files.append(out / f"coverage_{stem}.csv")
        write_text(files[-1], _csv(["n", *layers, "mean"],
                                   [[int(n), *map(repr, map(float, coverage[:, j])), repr(float(coverage[:, j].mean()))]
                                    for j, n in enumerate(ns)]))
        files += plots.save(plots.coverage_plot(ns, coverage, records), out, f"coverage_{stem}")
        with_steps = [r for r in records if r.step_predictions]
        if with_steps:
            if run is None:
                notes.append(f"{name}: step_predictions present but no results file names this diagnostics file "
                             "(model arg diagnostics=...), so there is no gold to score them: no accuracy-per-step plot")
            else:
                samples = _samples_by_context(run, cache, notes)
                pairs = [(r, samples[r.context_hash].gold_index()) for r in with_steps if r.context_hash in samples]
                pairs = [(r, gold) for r, gold in pairs if gold is not None]
                if pairs:
                    curve = step_accuracy([r.step_predictions for r, _ in pairs], [gold for _, gold in pairs])
                    files.append(out / f"steps_{stem}.csv")
                    write_text(files[-1], _csv(["step", "accuracy", "wrong_to_right", "right_to_wrong", "n"], [
                        [s, repr(curve.accuracy[s]), curve.wrong_to_right[s], curve.right_to_wrong[s], curve.n]
                        for s in range(len(curve.accuracy))]))
                    files += plots.save(plots.step_accuracy_plot(curve, [r for r, _ in pairs]), out, f"steps_{stem}")
                else:
                    notes.append(f"{name}: no record with step_predictions matches a sample of {run.path} "
                                 "(rerun with --log_samples)")
        cost = mean_cost(records)
        if cost is not None:
            row = _row_of(run, table) if run is not None and table is not None else None
            label = row.method_label if row is not None else "/".join(sorted({r.method for r in records}))
            cost_rows.append((name, label, sum(r.cost is not None for r in records), cost,
                              _run_accuracy(run, table) if run is not None and table is not None else None))
    cost_markdown = ""
    if cost_rows:
        cost_markdown = _cost_markdown(cost_rows)
        files += [out / "cost.md", out / "cost.csv"]
        write_text(files[-2], cost_markdown)
        write_text(files[-1], _csv(["diagnostics", "run", "records", *COST_PARTS, "total", "accuracy"], [
            [name, label, n, *(repr(cost[p]) for p in (*COST_PARTS, "total")), "" if acc is None else repr(acc)]
            for name, label, n, cost, acc in cost_rows]))
        points = [(label, cost["total"], acc) for _, label, _, cost, acc in cost_rows if acc is not None]
        if points:
            files += plots.save(plots.cost_accuracy_plot(points), out, "cost_accuracy")
    return FigureOutput(tuple(files), cost_markdown, tuple(notes))


def _cost_markdown(rows: Sequence[tuple[str, str, int, dict[str, float], float | None]]) -> str:
    header = ["Diagnostics", "Run", "questions", *COST_PARTS, "total", "acc (%)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---", ":---"] + ["---:"] * (len(header) - 2)) + "|"]
    for name, label, n, cost, acc in rows:
        values = [name, label, str(n), *(f"{cost[p]:,.0f}" for p in (*COST_PARTS, "total")),
                  "—" if acc is None else f"{100 * acc:.2f}"]
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in values) + " |")
    note = ("- Mean token-layer evaluations per question, as the diagnostics' `cost` records them: the question's "
            "own scoring, preparing its neighbours, and the optimisation's forward and backward passes. acc: the "
            "accuracy of the results file whose model args name the diagnostics file (its leaderboard cells).")
    return "\n".join(lines) + "\n\n" + note + "\n"
