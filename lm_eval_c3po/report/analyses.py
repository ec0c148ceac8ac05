"""The paper's analyses of re-mixing from diagnostics records (Figures 4, 5, 6, 8), as pure functions,
and the link from a diagnostics file to the lm-eval run that wrote it.

- :func:`expert_coverage` (Figure 5): the share of the final top-k experts that lie in the initial
  top-n, for n = k .. E, per critical layer.
- :func:`step_accuracy` (Figure 6): accuracy of the test contexts' predicted choice at each NGD step,
  and the flips against step 0, given the gold choices.
- :func:`mean_cost` (Figure 4): mean token-layer evaluations per question, by part.
- :func:`link_runs`: which results file a diagnostics run belongs to (the ``diagnostics=`` model arg),
  so its questions can be joined with that run's samples (gold, flips against base).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm_eval_c3po.report.diagnostics import COST_PARTS, ContextDiagnostics
from lm_eval_c3po.report.results import Run

_RANK_SUFFIX = re.compile(r"_rank\d+$")


def expert_coverage(before: np.ndarray, after_topk: np.ndarray) -> np.ndarray:
    """Coverage curves: ``before`` is [R, L, E] initial router weights, ``after_topk`` [R, L, k] the final
    top-k expert ids; returns [L, E - k + 1], entry (l, j) = mean over the R contexts of the share of
    the final top-k of layer l that lies among the top-(k + j) experts of the initial weights.

    Ranks of equal initial weights follow the lower expert id (stable), as everywhere in the report.
    """
    before, after_topk = np.asarray(before, dtype=float), np.asarray(after_topk, dtype=int)
    if before.ndim != 3 or after_topk.ndim != 3 or before.shape[:2] != after_topk.shape[:2]:
        raise ValueError(f"need before [R, L, E] and after_topk [R, L, k]; got {before.shape} and {after_topk.shape}")
    num_experts, k = before.shape[2], after_topk.shape[2]
    order = np.argsort(-before, axis=2, kind="stable")
    rank = np.argsort(order, axis=2)  # the inverse permutation: expert id -> its initial rank
    final_ranks = np.take_along_axis(rank, after_topk, axis=2)  # [R, L, k]: initial rank of each final expert
    ns = np.arange(k, num_experts + 1)
    covered = (final_ranks[..., None] < ns).sum(axis=2) / k  # [R, L, len(ns)]
    return covered.mean(axis=0)


def coverage_of_records(records: Sequence[ContextDiagnostics]) -> tuple[np.ndarray, np.ndarray]:
    """(n values, [L, len(n)] coverage) of one diagnostics run."""
    before = np.stack([r.before for r in records])
    after = np.array([[list(experts) for experts in r.after_topk] for r in records])
    return np.arange(after.shape[2], before.shape[2] + 1), expert_coverage(before, after)


@dataclass(frozen=True)
class StepCurve:
    """Accuracy per NGD step (step 0 = the model's own pathway) and flips against step 0."""

    n: int
    accuracy: tuple[float, ...]
    wrong_to_right: tuple[int, ...]
    right_to_wrong: tuple[int, ...]


def step_accuracy(predictions: Sequence[Sequence[int]], gold: Sequence[int]) -> StepCurve:
    """``predictions[i][s]`` is context i's predicted choice after s steps; curves run to the shortest record."""
    if not predictions or len(predictions) != len(gold):
        raise ValueError(f"need one gold per prediction list; got {len(predictions)} lists and {len(gold)} golds")
    steps = min(len(p) for p in predictions)
    pred = np.array([list(p[:steps]) for p in predictions])
    right = pred == np.asarray(gold)[:, None]
    start = right[:, :1]
    return StepCurve(
        n=len(predictions),
        accuracy=tuple(float(x) for x in right.mean(axis=0)),
        wrong_to_right=tuple(int(x) for x in (~start & right).sum(axis=0)),
        right_to_wrong=tuple(int(x) for x in (start & ~right).sum(axis=0)),
    )


def mean_cost(records: Sequence[ContextDiagnostics]) -> dict[str, float] | None:
    """Mean of each cost part and their ``total`` over the records that carry a cost; None when none does."""
    costs = [r.cost for r in records if r.cost is not None]
    if not costs:
        return None
    out = {part: float(np.mean([c[part] for c in costs])) for part in COST_PARTS}
    out["total"] = sum(out[part] for part in COST_PARTS)
    return out


def _stem(path: str | Path) -> str:
    return _RANK_SUFFIX.sub("", Path(path).stem)


def link_runs(diagnostics: Mapping[str, Sequence[ContextDiagnostics]], runs: Sequence[Run]) -> dict[str, Run]:
    """Diagnostics run name -> the results file whose model args named its file (``diagnostics=PATH``).

    Matched on the file name (without lm-eval's ``_rankR`` suffix of data-parallel runs), since the
    path in the model args is relative to where ``lm_eval`` ran. Ambiguous or unmatched runs are left
    out: the figures that need the link then fall back or are skipped. Several runs naming the same
    file (a rerun) link to the newest.
    """
    linked: dict[str, Run] = {}
    for name, records in diagnostics.items():
        stems = {_stem(r.source) for r in records}
        methods = {r.method for r in records}
        matches = [run for run in runs if run.diagnostics and _stem(run.diagnostics) in stems
                   and run.method in methods]
        if matches:
            linked[name] = max(matches, key=lambda r: (r.date, str(r.path)))
    return linked
