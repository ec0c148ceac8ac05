"""Benchmark-level averaging for groups of benchmarks (used by ``c3po_six``).

Why: lm-eval 0.4.13's ``Group.aggregate`` pools a metric over the group's *leaf* tasks. For
``c3po_six`` that would average 57 MMLU subjects with 5 other benchmarks. The paper's number is
the plain mean of the six benchmark scores, MMLU's being its own (size-weighted) group score.

How: a group opts in with ``aggregation: !function c3po_aggregate.mean_of_children`` in its
``aggregate_metric_list``. lm-eval accepts a callable there but never calls it, so it is only a
marker. Importing this module (lm-eval does so when it resolves that ``!function``, i.e. when it
builds the group) wraps ``Group.aggregate`` once: after lm-eval's own aggregation, every opted-in
metric is recomputed as the unweighted mean over the group's *direct* children. Child groups
have their metrics already, because lm-eval aggregates groups bottom-up. Groups without the
marker are untouched.
"""

from __future__ import annotations

import logging

from lm_eval.api.group import Group
from lm_eval.api.metrics import unweighted_mean_stderr

log = logging.getLogger(__name__)


def mean_of_children(*_args, **_kwargs):
    """Marker for ``aggregate_metric_list[].aggregation``; never called by lm-eval."""
    raise RuntimeError("c3po_aggregate.mean_of_children is a marker, not an aggregation function")


mean_of_children._c3po_children_mean = True  # type: ignore[attr-defined]


def _children_mean(group: Group, out: dict, task_metrics: dict) -> None:
    for agg in group.aggregate_metric_list or []:
        if not getattr(agg.aggregation, "_c3po_children_mean", False):
            continue
        keys = [k for k in list(out) if k.startswith(f"{agg.metric},")]
        for key in keys:
            filt = key.split(",", 1)[1]
            stderr_key = f"{agg.metric}_stderr,{filt}"
            children = [task_metrics.get(name, {}) for name in group.child_names]
            if any(key not in child for child in children):
                # A mean over some of the benchmarks would be a different number under the
                # same name: report nothing rather than something misleading.
                missing = [n for n, c in zip(group.child_names, children) if key not in c]
                log.warning("group %s: %s missing in %s; not reported", group.name, key, missing)
                out.pop(key, None)
                out.pop(stderr_key, None)
                continue
            out[key] = sum(child[key] for child in children) / len(children)
            stderrs = [child.get(stderr_key) for child in children]
            if all(isinstance(s, (int, float)) for s in stderrs):
                out[stderr_key] = unweighted_mean_stderr(stderrs)
            else:
                out[stderr_key] = "N/A"


def _install() -> None:
    if getattr(Group.aggregate, "_c3po_wrapped", False):
        return  # lm-eval may re-import this file (it reloads task modules on mtime change)
    original = Group.aggregate

    def aggregate(self, task_metrics):
        out = original(self, task_metrics)
        _children_mean(self, out, task_metrics)
        return out

    aggregate._c3po_wrapped = True  # type: ignore[attr-defined]
    aggregate.__wrapped__ = original  # type: ignore[attr-defined]
    Group.aggregate = aggregate


_install()
