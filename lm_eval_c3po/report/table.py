"""Leaderboard table (paper Tables 1-2 style) from :class:`Run` records, and its Markdown/CSV renderings.

Pure functions: :func:`build_table` turns runs into a :class:`Table`; the
renderers only format it. Rows are model x method x the other model args, so
an NGD run with ``k=5`` is a different row from one with ``k=3``; columns are
the top-level benchmarks (a group with an aggregate score is one column, its
subtasks are folded into it), then the average and the delta against the same
model's ``base`` row (or ``hf`` when there is no ``base``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lm_eval_c3po.report.results import ReportError, Run

# Metrics reported as fractions by lm-eval; shown in percent like the paper.
PERCENT_METRICS = frozenset({"acc", "acc_norm", "exact_match", "f1"})
# Suite groups whose members are the table's columns (the suite's own aggregate is the Avg column).
SUITE_GROUPS = frozenset({"c3po_six"})
# Methods that serve as the reference of the delta column, in order of preference.
REFERENCE_METHODS = ("base", "hf")
# Rows in the order of the paper's Table 1, then anything else.
_METHOD_ORDER = {method: n for n, method in enumerate(
    ("hf", "base", "icl", "prefix_tuning", "soft_prompt", "mode_finding", "kernel_regression", "ngd", "oracle"))}
UPPER_BOUNDS = {"oracle": "oracle (upper bound)"}  # never a C3PO score: labelled as a bound


@dataclass(frozen=True)
class Cell:
    """One benchmark score of one row, and the file it came from."""

    value: float
    stderr: float | None
    source: Path
    reference: str | None = None


@dataclass(frozen=True)
class Row:
    """One leaderboard row; ``args`` are the model args other than pretrained/method."""

    model: str
    method: str
    args: tuple[tuple[str, Any], ...]
    label_args: tuple[str, ...]
    cells: Mapping[str, Cell]
    average: float | None
    average_stderr: float | None
    delta: float | None
    delta_vs: str | None
    reference_key: tuple[str, str, tuple[tuple[str, Any], ...]] | None = None

    @property
    def method_label(self) -> str:
        return method_label(self.method, self.args, self.label_args)

    @property
    def label(self) -> str:
        return f"{self.model} / {self.method_label}"

    @property
    def args_string(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.args)


@dataclass(frozen=True)
class Table:
    """The leaderboard: ``columns`` are benchmark names; ``notes`` explain every choice made for the reader."""

    metric: str
    columns: tuple[str, ...]
    rows: tuple[Row, ...]
    notes: tuple[str, ...]

    @property
    def percent(self) -> bool:
        return self.metric.split(",")[0] in PERCENT_METRICS


def method_label(method: str, args: Iterable[tuple[str, Any]], label_args: Iterable[str]) -> str:
    """The method plus the args that tell a row apart from its siblings, e.g. ``ngd (k=5)``."""
    shown = [f"{k}={v}" for k, v in args if k in set(label_args)]
    name = UPPER_BOUNDS.get(method, method)
    return f"{name} ({', '.join(shown)})" if shown else name


def metric_key(entry: Mapping[str, Any], metric: str) -> str | None:
    """The ``"metric,filter"`` key of ``entry`` for ``metric``: the exact key if a filter is given,
    else the ``none`` filter, else the only filter there is. ``None`` when the task lacks the metric."""
    if "," in metric:
        return metric if metric in entry else None
    if f"{metric},none" in entry:
        return f"{metric},none"
    keys = [k for k in entry if k.split(",")[0] == metric and "," in k]
    if len(keys) > 1:
        raise ReportError(
            f"metric '{metric}' has several filters ({', '.join(sorted(keys))}); "
            "name one with --metric METRIC,FILTER"
        )
    return keys[0] if keys else None


def _as_float(value: Any) -> float | None:
    """lm-eval writes ``"N/A"`` for a stderr it could not compute."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def benchmark_columns(run: Run, metric: str, suites: Collection[str] = SUITE_GROUPS) -> list[str]:
    """Top-level benchmarks of a run: roots of the group tree that have the metric (MMLU stays one
    column); groups without an aggregate score, and suite groups, are replaced by their subtasks."""
    children = {c for subs in run.group_subtasks.values() for c in subs}
    roots = [name for name in run.results if name not in children]

    def walk(name: str) -> list[str]:
        entry = run.results.get(name, {})
        if metric_key(entry, metric) is not None and not (name in suites and run.group_subtasks.get(name)):
            return [name]
        return [col for sub in run.group_subtasks.get(name, []) for col in walk(sub)]

    return [col for root in roots for col in walk(root)]


def _cell(run: Run, task: str, metric: str) -> Cell:
    entry = run.results[task]
    key = metric_key(entry, metric)
    assert key is not None  # benchmark_columns only yields tasks that have the metric
    metric_name, _, filter_name = key.partition(",")
    stderr_key = f"{metric_name}_stderr,{filter_name}" if filter_name else f"{metric_name}_stderr"
    value = _as_float(entry[key])
    if value is None:
        raise ReportError(f"{run.path}: '{task}' has non-numeric {key} = {entry[key]!r}")
    return Cell(value=value, stderr=_as_float(entry.get(stderr_key)), source=run.path, reference=run.reference)


def _row_key(run: Run) -> tuple[str, str, tuple[tuple[str, Any], ...]]:
    return (run.pretrained, run.method, tuple(sorted((k, v) for k, v in run.args.items())))


def _when(date: float) -> str:
    return datetime.fromtimestamp(date).strftime("%Y-%m-%d %H:%M:%S")


def _merge_cells(
    runs: Sequence[Run], metric: str, suites: Collection[str]
) -> tuple[dict[tuple[str, str, tuple[tuple[str, Any], ...]], dict[str, Cell]], list[str]]:
    """Per row and benchmark, the newest run wins; the notes name every overruled file."""
    picked: dict[Any, dict[str, tuple[Run, Cell]]] = {}
    overruled: dict[tuple[Any, str], list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.date, str(r.path))):
        key = _row_key(run)
        for task in benchmark_columns(run, metric, suites):
            cells = picked.setdefault(key, {})
            if task in cells:
                overruled.setdefault((key, task), []).append(cells[task][0])
            cells[task] = (run, _cell(run, task, metric))
    by_files: dict[tuple[Any, Path, tuple[Path, ...]], list[str]] = {}
    for (key, task), old in overruled.items():
        newest = picked[key][task][0]
        by_files.setdefault((key, newest.path, tuple(r.path for r in old)), []).append(task)
    dates = {run.path: run.date for run in runs}
    notes = []
    for (key, newest, old), tasks in by_files.items():
        label = f"{key[0]} / {key[1]}" + (f" ({','.join(f'{k}={v}' for k, v in key[2])})" if key[2] else "")
        ignored = ", ".join(f"{path} ({_when(dates[path])})" for path in old)
        notes.append(
            f"{label}: {len(old) + 1} results for {', '.join(tasks)}; the newest wins: {newest} "
            f"({_when(dates[newest])}); ignored: {ignored}"
        )
    merged = {key: {task: cell for task, (_, cell) in cells.items()} for key, cells in picked.items()}
    return merged, notes


def _n_shot_conflicts(runs: Sequence[Run]) -> list[str]:
    """Different few-shot counts for one task do not stop the table, but the reader must know."""
    shots: dict[str, dict[Any, Path]] = {}
    for run in runs:
        for task, n in run.n_shot.items():
            shots.setdefault(task, {}).setdefault(n, run.path)
    return [
        f"{task}: different n-shot across files ("
        + ", ".join(f"{n}-shot in {path}" for n, path in sorted(by_n.items(), key=lambda kv: str(kv[0])))
        + ")"
        for task, by_n in sorted(shots.items())
        if len(by_n) > 1
    ]


def _label_args(keys: Iterable[tuple[str, str, tuple[tuple[str, Any], ...]]]) -> dict[tuple[str, str], set[str]]:
    """Per (model, method), the arg names whose values differ between its rows: those go in the label."""
    by_group: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for model, method, args in keys:
        by_group.setdefault((model, method), []).append(dict(args))
    varying: dict[tuple[str, str], set[str]] = {}
    for group, arg_dicts in by_group.items():
        names = {k for d in arg_dicts for k in d}
        varying[group] = {k for k in names if len({repr(d.get(k, "<unset>")) for d in arg_dicts}) > 1}
    return varying


def _args_order(args: tuple[tuple[str, Any], ...]) -> tuple:
    """Sort key that puts ``k=3`` before ``k=10`` (numbers numerically, then everything else as text)."""
    return tuple(
        (name, (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v)))
        for name, v in args
    )


def _average(cells: Mapping[str, Cell], columns: Sequence[str]) -> tuple[float | None, float | None]:
    """Unweighted mean over all columns (as in the paper), only when the row has every benchmark;
    its stderr assumes independent benchmarks."""
    if not columns or any(c not in cells for c in columns):
        return None, None
    mean = sum(cells[c].value for c in columns) / len(columns)
    errs = [e for c in columns if (e := cells[c].stderr) is not None]
    stderr = math.sqrt(sum(e * e for e in errs)) / len(columns) if len(errs) == len(columns) else None
    return mean, stderr


def reference_key(row_key: tuple[str, str, tuple], keys: Sequence[tuple[str, str, tuple]]) -> tuple | None:
    """The same model's ``base`` row (else ``hf``); among several, the one sharing most model args."""
    model, method, args = row_key
    for ref_method in REFERENCE_METHODS:
        candidates = [k for k in keys if k[0] == model and k[1] == ref_method]
        if candidates:
            best = max(candidates, key=lambda k: (len(set(k[2]) & set(args)), -keys.index(k)))
            return None if best == row_key else best
    return None


def build_table(runs: Sequence[Run], metric: str = "acc", suites: Collection[str] = SUITE_GROUPS) -> Table:
    """The leaderboard for ``metric`` (``acc``, ``acc_norm``, or ``metric,filter``); ``suites`` are groups
    shown as their member benchmarks rather than as one column."""
    merged, notes = _merge_cells(runs, metric, suites)
    notes.extend(_n_shot_conflicts(runs))
    if not merged:
        tasks = sorted({t for r in runs for t in r.results})
        raise ReportError(
            f"no task in the results has metric '{metric}' (tasks: {', '.join(tasks)}); choose another with --metric"
        )
    columns = tuple(sorted({task for cells in merged.values() for task in cells}))
    keys = sorted(merged, key=lambda k: (k[0], _METHOD_ORDER.get(k[1], len(_METHOD_ORDER)), k[1],
                                         _args_order(k[2])))
    varying = _label_args(keys)
    averages = {key: _average(merged[key], columns) for key in keys}
    rows = []
    for key in keys:
        model, method, args = key
        mean, stderr = averages[key]
        ref = reference_key(key, keys)
        ref_mean = averages[ref][0] if ref else None
        delta = None if mean is None or ref_mean is None else mean - ref_mean
        rows.append(
            Row(
                model=model,
                method=method,
                args=args,
                label_args=tuple(sorted(varying[(model, method)])),
                cells=merged[key],
                average=mean,
                average_stderr=stderr,
                delta=delta,
                delta_vs=method_label(ref[1], ref[2], varying[(ref[0], ref[1])]) if delta is not None else None,
                reference_key=ref,
            )
        )
    missing = [
        f"{r.label} lacks {', '.join(c for c in columns if c not in r.cells)}" for r in rows if r.average is None
    ]
    if missing:
        notes.append("no average (and no delta) for rows missing a benchmark: " + "; ".join(missing))
    for row in rows:
        stores = {c: cell.reference for c, cell in row.cells.items() if cell.reference}
        if len(set(stores.values())) > 1:
            notes.append(f"{row.label} reference stores: " + "; ".join(f"{c}: {s}" for c, s in sorted(stores.items())))
    return Table(metric=metric, columns=columns, rows=tuple(rows), notes=tuple(notes))


# ---------------------------------------------------------------- rendering


def _fmt(value: float | None, percent: bool, signed: bool = False) -> str:
    if value is None:
        return "—"
    shown = value * 100 if percent else value
    digits = 2 if percent else 4
    return f"{shown:+.{digits}f}" if signed else f"{shown:.{digits}f}"


def _fmt_pm(value: float | None, stderr: float | None, percent: bool) -> str:
    if value is None:
        return "—"
    if stderr is None:
        return _fmt(value, percent)
    return f"{_fmt(value, percent)} ± {_fmt(stderr, percent)}"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(table: Table) -> str:
    """GitHub Markdown: one line per row, ``value ± stderr`` cells, then the notes a reader needs."""
    unit = " (%)" if table.percent else ""
    header = ["Model", "Method", *table.columns, f"Avg {table.metric}{unit}", "Δ vs base"]
    lines = [
        "| " + " | ".join(_md_escape(h) for h in header) + " |",
        "|" + "|".join([":---", ":---"] + ["---:"] * (len(header) - 2)) + "|",
    ]
    for row in table.rows:
        cells = [
            _fmt_pm(c.value, c.stderr, table.percent) if (c := row.cells.get(col)) else "—" for col in table.columns
        ]
        delta = _fmt(row.delta, table.percent, signed=True)
        if row.delta is not None:
            delta += f" (vs {row.delta_vs})"
        values = [row.model, row.method_label, *cells, _fmt_pm(row.average, row.average_stderr, table.percent), delta]
        lines.append("| " + " | ".join(_md_escape(v) for v in values) + " |")
    points = "points" if table.percent else "metric units"
    notes = [
        f"Cells: {table.metric}{unit}, mean ± stderr as reported by lm-eval. Avg: unweighted mean over the "
        f"{len(table.columns)} benchmarks (its stderr assumes independent benchmarks). Δ: Avg minus the same "
        f"model's base row (hf when there is no base), in {points}.",
        *table.notes,
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {_md_escape(n)}" for n in notes) + "\n"


def _csv_header(columns: Sequence[str]) -> list[str]:
    per_task = [name for col in columns for name in (col, f"{col}_stderr")]
    return ["model", "method", "other_args", "label", *per_task, "average", "average_stderr", "delta", "delta_vs"]


def to_csv(table: Table) -> str:
    """Machine-readable table: raw lm-eval values (fractions, not percent) at full precision."""

    def raw(value: float | None) -> str:
        return "" if value is None else repr(value)

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_csv_header(table.columns))
    for row in table.rows:
        per_task = []
        for col in table.columns:
            cell = row.cells.get(col)
            per_task += [raw(cell.value), raw(cell.stderr)] if cell else ["", ""]
        writer.writerow(
            [row.model, row.method, row.args_string, row.label, *per_task]
            + [raw(row.average), raw(row.average_stderr), raw(row.delta), row.delta_vs or ""]
        )
    return out.getvalue()
