"""Find parameter sweeps among leaderboard rows: runs whose model args differ in exactly one key.

A sweep (e.g. NGD with k = 1, 3, 5, 8 and everything else fixed) becomes one
accuracy-vs-parameter plot. Rows of one model and method are bucketed by
"all args except K"; a bucket with two or more values of K is a sweep. A row
may sit in several sweeps (a k-sweep at steps=10 and a steps-sweep at k=3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lm_eval_c3po.report.table import REFERENCE_METHODS, Row, Table


@dataclass(frozen=True)
class Sweep:
    """Rows of one model and method that vary only ``param``; ``reference`` is the model's base/hf row."""

    model: str
    method: str
    param: str
    fixed: tuple[tuple[str, Any], ...]
    points: tuple[tuple[Any, Row], ...]
    reference: Row | None

    @property
    def numeric(self) -> bool:
        """A numeric parameter gets a true numeric axis; anything else (``layers=last:3``) is categorical."""
        return all(_is_number(v) for v, _ in self.points)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _reference_row(table: Table, model: str) -> Row | None:
    for method in REFERENCE_METHODS:
        for row in table.rows:
            if row.model == model and row.method == method:
                return row
    return None


def find_sweeps(table: Table) -> list[Sweep]:
    """Every one-parameter sweep in the table, sorted by model, method and parameter."""
    buckets: dict[tuple[str, str, str, tuple[tuple[str, Any], ...]], list[tuple[Any, Row]]] = {}
    for row in table.rows:
        if row.method in REFERENCE_METHODS:
            continue
        for name, value in row.args:
            fixed = tuple((k, v) for k, v in row.args if k != name)
            buckets.setdefault((row.model, row.method, name, fixed), []).append((value, row))
    sweeps = []
    for (model, method, param, fixed), points in sorted(buckets.items(), key=lambda kv: repr(kv[0])):
        if len(points) < 2:
            continue
        numeric = all(_is_number(v) for v, _ in points)
        ordered = sorted(points, key=lambda p: p[0] if numeric else str(p[0]))
        sweeps.append(Sweep(model, method, param, fixed, tuple(ordered), _reference_row(table, model)))
    return sweeps
