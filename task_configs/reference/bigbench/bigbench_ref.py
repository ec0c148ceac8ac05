"""BIG-Bench docs with exactly one right choice, for reference sets.

``hails/bigbench`` rows carry ``multiple_choice_targets`` (the choices), ``multiple_choice_scores``
(1 for every right choice) and ``targets`` (the right answers). lm-eval's template takes
``multiple_choice_targets.index(targets[0])`` as the gold. Where several choices score 1 (or
``targets[0]`` is listed twice, or is not the choice that scores 1) that gold is one right
answer among several, so a model that picks another right answer counts as wrong and NGD's loss
would push it away from a right answer. Reference sets keep only docs whose gold is unambiguous.
"""

from __future__ import annotations

from lm_eval.tasks.bigbench.utils import filter_multiple_choice


def has_single_gold(doc: dict) -> bool:
    """True when exactly one choice is right and it is ``targets[0]``, listed once."""
    choices, scores, targets = doc["multiple_choice_targets"], doc["multiple_choice_scores"], doc["targets"]
    if len(choices) != len(scores) or sum(1 for s in scores if s) != 1 or not targets:
        return False
    right = choices[next(i for i, s in enumerate(scores) if s)]
    return targets[0] == right and choices.count(right) == 1


def single_gold_docs(dataset):
    """lm-eval's multiple-choice filter, then only the docs with one unambiguous gold."""
    return filter_multiple_choice(dataset).filter(has_single_gold)
