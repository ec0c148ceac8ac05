"""Per-question samples of lm-eval runs (``--log_samples``) and the join of two runs question by question.

lm-eval writes ``samples_<task>_<timestamp>.jsonl`` beside ``results_<timestamp>.json`` (the
same timestamp), one line per doc and filter: ``doc_id``, ``doc_hash`` (SHA-256 of the doc),
``target``, ``arguments`` (``{"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}``),
``filter`` and one key per metric (``acc``: 1.0 or 0.0). A group (MMLU) has one file per leaf
task. Two runs are joined per leaf task by ``doc_id``; the join refuses, naming what to rerun,
when a run has no samples, when the doc sets or the docs themselves (``doc_hash``) differ, or
when the task versions differ.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lm_eval_c3po.report.results import RESULTS_TIMESTAMP, ReportError, Run


@dataclass(frozen=True)
class Sample:
    """One doc of one run: whether the metric counted it right, and what identifies it."""

    task: str
    doc_id: int
    doc_hash: str | None
    value: float
    target: Any
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]

    @property
    def correct(self) -> bool:
        return self.value == 1.0

    @property
    def context_hashes(self) -> tuple[str, ...]:
        """SHA-1 of each distinct context, as ``--model c3po`` diagnostics name a test context."""
        return tuple(context_hash(c) for c in self.contexts)

    def gold_index(self) -> int | None:
        """The gold choice's index: lm-eval's target when it is one, else the continuation it names."""
        target = self.target
        if isinstance(target, bool):
            return None
        if isinstance(target, int):
            return target
        if isinstance(target, str):
            if target.strip().isdigit():
                return int(target.strip())
            stripped = [c.strip() for c in self.continuations]
            if target.strip() in stripped:
                return stripped.index(target.strip())
        return None


def context_hash(text: str) -> str:
    """The name ``--model c3po`` gives a test context in its diagnostics (SHA-1 of the context text)."""
    return hashlib.sha1(text.encode()).hexdigest()


def split_metric(metric: str) -> tuple[str, str | None]:
    """``"acc"`` -> ("acc", None: the ``none`` filter or the only one); ``"exact_match,strict"`` -> both parts."""
    name, _, filter_name = metric.partition(",")
    return name, filter_name or None


def samples_path(run: Run, task: str) -> Path:
    """Where lm-eval put ``task``'s samples for this results file (same folder, same timestamp)."""
    match = RESULTS_TIMESTAMP.search(run.path.name)
    if not match:
        raise ReportError(
            f"{run.path}: the file name carries no lm-eval timestamp, so its samples_<task>_<timestamp>.jsonl "
            "cannot be found; keep the results and samples files under the names lm-eval gave them"
        )
    return run.path.parent / f"samples_{task}_{match.group(1)}.jsonl"


def leaf_tasks(run: Run, task: str) -> list[str]:
    """The tasks that have samples: ``task`` itself, or the leaves of a group (MMLU's subjects)."""
    children = run.group_subtasks.get(task)
    if not children:
        return [task]
    return [leaf for child in children for leaf in leaf_tasks(run, child)]


def _arguments(record: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Distinct contexts and the continuations of a sample's requests (lm-eval's sanitised layout or raw lists)."""
    args = record.get("arguments") or {}
    requests = list(args.values()) if isinstance(args, dict) else list(args)
    contexts, continuations = [], []
    for request in requests:
        parts = [request[k] for k in sorted(request)] if isinstance(request, dict) else list(request)
        if parts and isinstance(parts[0], str):
            contexts.append(parts[0])
        if len(parts) > 1 and isinstance(parts[1], str):
            continuations.append(parts[1])
    return tuple(dict.fromkeys(contexts)), tuple(continuations)


def load_samples(run: Run, task: str, metric: str, cache: dict | None = None) -> dict[int, Sample]:
    """doc_id -> :class:`Sample` of one leaf task of one run, for ``metric`` (its filter, else ``none``).

    ``cache`` (a dict the caller keeps) avoids rereading a base run compared with many methods.
    """
    key = (run.path, task, metric)
    if cache is not None and key in cache:
        return cache[key]
    path = samples_path(run, task)
    if not path.is_file():
        raise ReportError(
            f"{run.path} has no per-question samples for task '{task}' (no {path.name} beside it); paired "
            f"statistics need them: rerun {run.pretrained} / {run.method} on {task} with `lm_eval ... --log_samples`"
        )
    name, wanted_filter = split_metric(metric)
    by_filter: dict[str, dict[int, Sample]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}:{number}: not valid JSON ({err})") from err
        if "doc_id" not in record:
            raise ReportError(f"{path}:{number}: no 'doc_id'; is this an lm-eval samples file?")
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
            raise ReportError(
                f"{path}:{number}: metric '{name}' is {value!r}, not right/wrong per question; paired statistics "
                "need a 0/1 metric such as acc or acc_norm (choose it with --metric)"
            )
        contexts, continuations = _arguments(record)
        sample = Sample(
            task=task, doc_id=int(record["doc_id"]), doc_hash=record.get("doc_hash"), value=float(value),
            target=record.get("target"), contexts=contexts, continuations=continuations,
        )
        docs = by_filter.setdefault(str(record.get("filter", "none")), {})
        if sample.doc_id in docs and docs[sample.doc_id].value != sample.value:
            raise ReportError(f"{path}:{number}: doc_id {sample.doc_id} appears twice with different '{name}'")
        docs.setdefault(sample.doc_id, sample)
    if wanted_filter is not None:
        chosen = by_filter.get(wanted_filter)
    elif "none" in by_filter or len(by_filter) <= 1:
        chosen = by_filter.get("none") or next(iter(by_filter.values()), None)
    else:
        raise ReportError(
            f"{path} has metric '{name}' under several filters ({', '.join(sorted(by_filter))}); "
            "name one with --metric METRIC,FILTER"
        )
    if not chosen:
        raise ReportError(f"{path} has no samples with metric '{metric}'; choose another with --metric")
    if cache is not None:
        cache[key] = chosen
    return chosen


@dataclass(frozen=True)
class Joined:
    """Two runs' samples of one benchmark, aligned: entry i of ``base`` and ``method`` is the same doc."""

    base: tuple[Sample, ...]
    method: tuple[Sample, ...]

    @property
    def base_correct(self) -> np.ndarray:
        return np.array([s.correct for s in self.base], dtype=bool)

    @property
    def method_correct(self) -> np.ndarray:
        return np.array([s.correct for s in self.method], dtype=bool)


def _check_versions(base: Run, method: Run, task: str) -> None:
    old, new = base.versions.get(task), method.versions.get(task)
    if old is not None and new is not None and str(old) != str(new):
        raise ReportError(
            f"task '{task}' is version {old} in {base.path} but version {new} in {method.path}; questions of "
            "different task versions cannot be paired: rerun the older run with the current task configs"
        )


def join_runs(base: Run, method: Run, task: str, metric: str, cache: dict | None = None) -> Joined:
    """Align ``base`` and ``method`` on ``task`` (a leaf or a group) question by question, or refuse."""
    base_out: list[Sample] = []
    method_out: list[Sample] = []
    for leaf in leaf_tasks(method, task):
        _check_versions(base, method, leaf)
        left = load_samples(base, leaf, metric, cache)
        right = load_samples(method, leaf, metric, cache)
        if left.keys() != right.keys():
            only_base = sorted(left.keys() - right.keys())
            only_method = sorted(right.keys() - left.keys())
            raise ReportError(
                f"task '{leaf}': {base.path} has {len(left)} docs and {method.path} has {len(right)}; "
                f"{len(only_base)} doc ids only in the first (e.g. {only_base[:3]}), {len(only_method)} only in the "
                f"second (e.g. {only_method[:3]}). Paired statistics need the same docs: rerun both with the same "
                "--limit / --samples and task config"
            )
        for doc_id in sorted(left):
            a, b = left[doc_id], right[doc_id]
            if a.doc_hash and b.doc_hash and a.doc_hash != b.doc_hash:
                raise ReportError(
                    f"task '{leaf}', doc_id {doc_id}: the doc differs between {base.path} and {method.path} "
                    "(doc_hash); the runs saw different data (another dataset revision or task config): rerun "
                    "the older run with the current task configs"
                )
            base_out.append(a)
            method_out.append(b)
    return Joined(tuple(base_out), tuple(method_out))
