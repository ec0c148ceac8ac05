"""Was the model right? The verdict lm-eval gives a multiple-choice doc, computed the same way.

Mirrors ``ConfigurableTask.process_results`` for ``output_type: multiple_choice``
(lm-eval 0.4.x): gold is ``doc_to_target`` (``doc_to_text`` for
``multiple_input`` tasks such as WinoGrande's partial scoring), a string gold
is looked up among the choices, ``acc`` is the argmax of the summed
log-likelihoods and ``acc_norm`` the argmax after dividing by each choice's
length in characters. ``np.argmax`` breaks ties towards the first choice, as
in lm-eval. We recompute instead of calling ``process_results`` because that
only reports the metrics a task's YAML lists, and the store needs both flags
for every task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reference_builders.errors import BuildError


@dataclass(frozen=True)
class Verdict:
    """lm-eval's ``acc`` and ``acc_norm`` for one doc, as booleans."""

    correct: bool
    correct_norm: bool


def gold_index(task, doc: dict, choices: Sequence[str]) -> int | None:
    """The gold choice index of ``doc`` as lm-eval resolves it; None when it lies outside the choices.

    lm-eval scores such a doc 0 with a warning; the builder skips it (a record needs a gold answer).
    """
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, list):
        raise BuildError(
            f"task {task.task_name!r} has several gold answers per doc; a reference store keeps one gold "
            "index per doc, so harvest a single-target multiple-choice task instead"
        )
    if isinstance(gold, str):
        return choices.index(gold) if gold in choices else None
    return int(gold) if 0 <= int(gold) < len(choices) else None


def judge(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> Verdict:
    """lm-eval's verdict from the per-choice log-likelihoods (in choice order)."""
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    completion_len = np.array([float(len(c)) for c in choices])
    return Verdict(
        correct=bool(np.argmax(lls) == gold),
        correct_norm=bool(np.argmax(lls / completion_len) == gold),
    )
