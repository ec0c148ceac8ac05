"""Which docs a build harvests: a seeded sample of each source at the paper's size (Table 7).

A *source* is a row of the paper's Table 7 (BIG-Bench, SuperGLUE, CommonsenseQA, ...), i.e. an
lm-eval task or group; its size is split over its leaf tasks in proportion to their doc counts
(:func:`split_sizes`). Within a task, docs are ranked by a BLAKE2b hash of ``(seed, task name,
doc index)`` and taken in that order (:func:`sample_order`), skipping malformed docs, until the
task's share is reached; the chosen ids are then harvested in doc order.

Everything here is a pure function of (seed, task name, doc count, the docs themselves): no
Python ``hash()`` (salted per process), no global RNG, nothing that depends on the batch size or
on how many processes share the work. Every rank of a launch computes the same sample, and an
interrupted build recomputes it on rerun and resumes it (the store writer skips finished docs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# How many malformed docs per task the manifest quotes (all are counted).
MALFORMED_EXAMPLES = 3


def doc_key(seed: int, task: str, index: int) -> bytes:
    """The rank of doc ``index`` of ``task`` in the sample order (its hash; ties impossible in practice)."""
    return hashlib.blake2b(f"{seed}\x00{task}\x00{index}".encode(), digest_size=8).digest()


def sample_order(seed: int, task: str, num_docs: int) -> list[int]:
    """Doc indices ``0..num_docs-1`` in sample order: a permutation fixed by (seed, task, num_docs)."""
    return sorted(range(num_docs), key=lambda i: (doc_key(seed, task, i), i))


def split_sizes(total: int, sizes: Mapping[str, int]) -> dict[str, int]:
    """``total`` docs split over subtasks in proportion to their ``sizes`` (doc counts).

    Largest-remainder rounding in exact integer arithmetic (ties go to the larger subtask, then
    the name), so the shares add up to ``min(total, sum(sizes))``: the same docs a uniform sample
    of the source's union would take, in expectation, with exact counts. No share exceeds its
    subtask's size (each is at most ``size * total / sum(sizes)`` rounded up, and rounding up
    happens only below the size), so a source smaller than ``total`` gives every doc.
    """
    if total < 0 or any(n < 0 for n in sizes.values()):
        raise ValueError(f"sizes must be >= 0: total {total}, subtasks {dict(sizes)}")
    whole = sum(sizes.values())
    left = min(total, whole)
    if whole == 0:
        return {name: 0 for name in sizes}
    quota = {name: divmod(n * left, whole) for name, n in sizes.items()}
    shares = {name: floor for name, (floor, _) in quota.items()}
    rest = left - sum(shares.values())
    for name in sorted(sizes, key=lambda name: (-quota[name][1], -sizes[name], name))[:rest]:
        shares[name] += 1
    return shares


@dataclass
class TaskDraw:
    """One task's part of the sample: the doc ids to harvest (in doc order) and the malformed docs met."""

    docs: int
    asked: int | None
    ids: list[int] = field(default_factory=list)
    malformed: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"docs": self.docs, "asked": self.asked, "taken": len(self.ids),
                               "malformed": len(self.malformed)}
        if self.malformed:
            out["malformed_examples"] = {str(i): why for i, why in list(self.malformed.items())[:MALFORMED_EXAMPLES]}
        return out


def draw(
    order: Sequence[int], want: int | None, problem: Callable[[int], str | None], docs: int, *, asked: int | None = None
) -> TaskDraw:
    """Walk ``order``, keep docs without a ``problem`` until ``want`` are kept (all when None).

    ``asked`` is what the manifest reports as asked (default ``want``; ``--limit`` asks for the
    first N docs, all of which are walked).
    ``problem(i)`` says why doc ``i`` cannot be a reference (None when it can); those docs are
    recorded, not kept, and the walk goes on, so a malformed doc costs the sample nothing as long
    as the task has enough good ones.
    """
    out = TaskDraw(docs=docs, asked=want if asked is None else asked)
    if want == 0:
        return out
    for i in order:
        why = problem(i)
        if why is not None:
            out.malformed[i] = why
            continue
        out.ids.append(i)
        if want is not None and len(out.ids) >= want:
            break
    out.ids.sort()
    return out


def sources_of(leaves: Sequence[str], group_map: Mapping[str, Sequence[str]], sized: Sequence[str]) -> dict[str, list[str]]:
    """Each leaf task under its nearest ancestor (itself included) named in ``sized``; unsized leaves stand alone.

    ``group_map`` is lm-eval's ``TaskManager.load(...)["group_map"]`` (group -> members).
    """
    parent: dict[str, str] = {}
    for group, members in group_map.items():
        for member in members:
            parent.setdefault(member, group)
    out: dict[str, list[str]] = {}
    for leaf in leaves:
        node: str | None = leaf
        while node is not None and node not in sized:
            node = parent.get(node)
        out.setdefault(node if node is not None else leaf, []).append(leaf)
    return out


@dataclass
class SourceDraw:
    """One source's sample: the size asked, and each of its tasks' draws."""

    asked: int | None
    tasks: dict[str, TaskDraw]

    def to_dict(self) -> dict[str, Any]:
        draws = self.tasks.values()
        return {
            "asked": self.asked,
            "docs": sum(d.docs for d in draws),
            "taken": sum(len(d.ids) for d in draws),
            "malformed": sum(len(d.malformed) for d in draws),
            "tasks": {name: d.to_dict() for name, d in self.tasks.items()},
        }


def plan_sample(
    doc_counts: Mapping[str, int],
    group_map: Mapping[str, Sequence[str]],
    sizes: Mapping[str, int | None],
    seed: int,
    problem: Callable[[str, int], str | None],
    *,
    first: Mapping[str, int] | None = None,
) -> dict[str, SourceDraw]:
    """The whole sample: ``{source: SourceDraw}`` over the leaf tasks of ``doc_counts`` (task -> doc count).

    ``sizes`` maps sources (tasks or groups) to their size, None meaning every doc. ``first``
    (``--limit``) replaces the sample for the tasks it names: their first N docs, in doc order.
    ``problem(task, i)`` is the malformed-doc check of :func:`draw`.
    """
    plan: dict[str, SourceDraw] = {}
    for source, leaves in sources_of(list(doc_counts), group_map, list(sizes)).items():
        asked = sizes.get(source)
        shares = split_sizes(asked, {t: doc_counts[t] for t in leaves}) if asked is not None else {}
        draws = {}
        for task in leaves:
            n = doc_counts[task]
            check = lambda i, task=task: problem(task, i)  # noqa: E731
            if first is not None:
                draws[task] = draw(range(min(first[task], n)), None, check, n, asked=min(first[task], n))
            elif asked is None:
                draws[task] = draw(range(n), None, check, n)
            else:
                draws[task] = draw(sample_order(seed, task, n), shares[task], check, n)
        plan[source] = SourceDraw(asked=asked if first is None else None, tasks=draws)
    return plan
