"""Read the ``diagnostics`` JSONL that ``--model c3po`` writes (one object per optimised test context).

Only the before/after routing weights are required; every other key is
optional and gets a sensible default (layer ids 0..L-1, top-k derived from the
weights, no loss curve), so files from older or partial runs still plot. Two
optional keys feed the paper's Figures 6 and 4: ``step_predictions`` (the test
context's predicted choice index at each NGD step, step 0 = before any step) and
``cost`` (token-layer evaluations for the question: ``own``, ``neighbours``,
``optimisation_forward``, ``optimisation_backward``); records without them are
simply left out of those figures.
Errors name the file and line so a bad record can be found.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lm_eval_c3po.report.results import ReportError


@dataclass(frozen=True)
class ContextDiagnostics:
    """One test context's pathway before and after re-mixing; arrays are critical layers x experts."""

    source: Path
    line: int
    context_hash: str
    context: str
    task: str | None
    method: str
    critical_layers: tuple[int, ...]
    top_k: int
    before: np.ndarray
    after: np.ndarray
    before_topk: tuple[tuple[int, ...], ...]
    after_topk: tuple[tuple[int, ...], ...]
    loss: tuple[float, ...]
    steps: int | None
    step_predictions: tuple[int, ...] | None = None
    cost: dict[str, float] | None = None

    @property
    def num_experts(self) -> int:
        return int(self.before.shape[1])


def _topk_from_weights(weights: np.ndarray, k: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(e) for e in np.argsort(-row, kind="stable")[:k]) for row in weights)


def _side(record: dict[str, Any], name: str, where: str) -> tuple[np.ndarray, list[list[int]] | None]:
    side = record.get(name)
    if not isinstance(side, dict) or "weights" not in side:
        raise ReportError(f"{where}: no '{name}.weights'; each record needs the pathway before and after re-mixing")
    weights = np.asarray(side["weights"], dtype=float)
    if weights.ndim != 2 or weights.size == 0:
        raise ReportError(
            f"{where}: '{name}.weights' must be a non-empty [layers][experts] list, got shape {weights.shape}"
        )
    return weights, side.get("topk")


def parse_record(record: dict[str, Any], source: Path, line: int) -> ContextDiagnostics:
    """Validate one JSON object and fill in the optional keys."""
    where = f"{source}:{line}"
    before, before_topk = _side(record, "before", where)
    after, after_topk = _side(record, "after", where)
    if before.shape != after.shape:
        raise ReportError(f"{where}: before.weights is {before.shape} but after.weights is {after.shape}")
    layers = tuple(int(x) for x in record.get("critical_layers") or range(before.shape[0]))
    if len(layers) != before.shape[0]:
        raise ReportError(f"{where}: {len(layers)} critical_layers but weights for {before.shape[0]} layers")
    num_experts = record.get("num_experts")
    if num_experts is not None and num_experts != before.shape[1]:
        raise ReportError(f"{where}: num_experts is {num_experts} but the weights have {before.shape[1]} experts")
    top_k = record.get("top_k") or len((before_topk or after_topk or [[]])[0])
    if not top_k:
        raise ReportError(f"{where}: neither 'top_k' nor 'before.topk' is given; the top-k experts cannot be known")
    return ContextDiagnostics(
        source=source,
        line=line,
        context_hash=str(record.get("context_hash") or f"line {line}"),
        context=str(record.get("context") or ""),
        task=record.get("task"),
        method=str(record.get("method") or "unknown"),
        critical_layers=layers,
        top_k=int(top_k),
        before=before,
        after=after,
        before_topk=tuple(map(tuple, before_topk)) if before_topk else _topk_from_weights(before, int(top_k)),
        after_topk=tuple(map(tuple, after_topk)) if after_topk else _topk_from_weights(after, int(top_k)),
        loss=tuple(float(x) for x in record.get("loss") or ()),
        steps=record.get("steps"),
        step_predictions=_step_predictions(record.get("step_predictions"), where),
        cost=_cost(record.get("cost"), where),
    )


COST_PARTS = ("own", "neighbours", "optimisation_forward", "optimisation_backward")


def _step_predictions(value: Any, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise ReportError(f"{where}: 'step_predictions' must be a non-empty list of choice indices, got {value!r}")
    return tuple(value)


def _cost(value: Any, where: str) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(value.get(part), (int, float)) and not isinstance(value.get(part), bool) for part in COST_PARTS
    ):
        raise ReportError(f"{where}: 'cost' must give a number for each of {', '.join(COST_PARTS)}, got {value!r}")
    return {part: float(value[part]) for part in COST_PARTS}


def load_diagnostics(path: str | os.PathLike) -> list[ContextDiagnostics]:
    """All records of one JSONL file (blank lines skipped)."""
    source = Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ReportError(f"cannot read diagnostics file {source}: {err}") from err
    records = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ReportError(f"{source}:{number}: not valid JSON ({err})") from err
        records.append(parse_record(obj, source, number))
    if not records:
        raise ReportError(f"{source} holds no diagnostics records; was it written by `lm_eval --model c3po`?")
    return records


def group_by_run(paths: Iterable[str | os.PathLike]) -> dict[str, list[ContextDiagnostics]]:
    """Records grouped into plottable runs: one per file and method, named ``<file stem>[_<method>]``.

    A run must keep one layer set and expert count, otherwise its heatmap would average unlike things.
    """
    runs: dict[str, list[ContextDiagnostics]] = {}
    for path in paths:
        records = load_diagnostics(path)
        methods = sorted({r.method for r in records})
        for method in methods:
            name = Path(path).stem if len(methods) == 1 else f"{Path(path).stem}_{method}"
            if name in runs:
                raise ReportError(f"two diagnostics files give the run name '{name}'; rename one of them")
            runs[name] = [r for r in records if r.method == method]
    for name, records in runs.items():
        _check_same_shape(name, records)
    return runs


def _check_same_shape(name: str, records: Sequence[ContextDiagnostics]) -> None:
    first = records[0]
    for record in records[1:]:
        if record.critical_layers != first.critical_layers or record.num_experts != first.num_experts:
            raise ReportError(
                f"diagnostics run '{name}' mixes layouts: {first.source}:{first.line} has layers "
                f"{list(first.critical_layers)} x {first.num_experts} experts, {record.source}:{record.line} has "
                f"{list(record.critical_layers)} x {record.num_experts}; split them into separate files"
            )
