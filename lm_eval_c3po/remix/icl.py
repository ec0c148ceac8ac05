"""The ICL baseline: the retrieved neighbours prepended to the question as solved demonstrations."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lm_eval_c3po.retrieve import Neighbours
from lm_eval_c3po.store import ReferenceStore


def demonstration_prefixes(neighbours: Neighbours, store: ReferenceStore) -> list[str]:
    """Per context, its neighbours as solved blocks, the nearest last (next to the question).

    A block is the reference's rendered context followed by its gold
    continuation exactly as lm-eval scored it: the stored continuation already
    starts with the task's ``target_delimiter``, so none is added.
    """
    prefixes = []
    for row, valid in zip(neighbours.indices.tolist(), neighbours.valid.tolist()):
        demos = []
        for r, ok in zip(row, valid):
            if ok:
                text = store.texts[r]
                demos.append(text["question"] + text["choices"][int(store.gold[r])])
        prefixes.append("".join(d + "\n\n" for d in reversed(demos)))
    return prefixes


def with_prefixes(requests: Sequence, prefixes: dict[str, str]) -> list:
    """lm-eval ``Instance``s with their context text prefixed (other arguments unchanged)."""
    return [dataclasses.replace(req, arguments=(prefixes[req.args[0]] + req.args[0], *req.args[1:]))
            for req in requests]
