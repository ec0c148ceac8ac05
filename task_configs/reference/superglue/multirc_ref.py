"""MultiRC as a reference set: one answer candidate per question.

MultiRC (``aps/super_glue``, ``multirc``) has one row per (paragraph, question, answer candidate):
``paragraph``, ``question``, ``answer``, ``idx`` = {paragraph, question, answer} and ``label``
(1 = the candidate answer is correct, 0 = it is not). lm-eval's unit is the row, so every
candidate of a question repeats the same context ``paragraph + question``: the same question
embedding and, since the builder records the routing at the last context token, the same
pathway. A store holding all of them would answer one k-NN query with several copies of one
question (the near-duplicate filter only drops references close to the *test* question), and
MultiRC alone would be ~59% of the SuperGLUE rows. So the reference set keeps one candidate per
question: the one with the smallest BLAKE2b hash of its ``idx`` (a fixed, seedless choice that
is the same on every machine and does not favour the first-listed candidate).
"""

from __future__ import annotations

import hashlib


def _key(idx: dict) -> bytes:
    text = f"{idx['paragraph']}/{idx['question']}/{idx['answer']}"
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def one_answer_per_question(dataset):
    """The rows of ``dataset`` (a ``datasets.Dataset``) that represent their question, in dataset order."""
    best: dict[tuple[int, int], tuple[bytes, int]] = {}
    for row, idx in enumerate(dataset["idx"]):
        question = (idx["paragraph"], idx["question"])
        key = (_key(idx), row)
        if question not in best or key < best[question]:
            best[question] = key
    return dataset.select(sorted(row for _, row in best.values()))
