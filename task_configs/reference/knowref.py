"""KnowRef as a two-choice question (not in lm-eval).

Dataset: ``coref-data/knowref_60k_raw`` (KnowRef-60K, Emami et al., COLING 2020; JSON files
train/validation/test). One row per pronoun-resolution problem:

- ``swapped_sentence`` (str): space-tokenised sentence, names swapped to remove gender cues,
  the pronoun to resolve in square brackets, e.g. ``"Sam told Alex that [he] was late ."``
- ``candidate0`` / ``candidate1`` (str): the two candidate antecedents (the dataset card spells
  them ``candidate_0`` / ``candidate_1``; its conversion script reads ``candidate0``; both work)
- ``correct_candidate`` (str): ``"candidate_0"`` or ``"candidate_1"``
- ``original_sentence`` (str), ``annotation_strength`` (str, agreement 1-5): unused

Why a question rather than WinoGrande's partial scoring: the reference builder embeds the
rendered ``doc_to_text`` as the question and records the pathway at its last token, so the
context must be one string shared by both choices.
"""

from __future__ import annotations

import re

# Undo the corpus' tokenisation in the common cases (punctuation, clitics), so the model
# and the embedder see ordinary text.
_DETOK = [
    (re.compile(r" ([.,!?;:%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", re.IGNORECASE), r"\1"),
    (re.compile(r"`` ?| ?''"), '"'),
]


# ``correct_candidate`` as the dataset writes it. Anything else is a malformed row: the reference
# builder skips and counts it rather than guess.
_GOLD = {"candidate_0": 0, "candidate_1": 1}


def _detokenize(text: str) -> str:
    for pattern, repl in _DETOK:
        text = pattern.sub(repl, text)
    return text.strip()


def _sentence_and_pronoun(doc: dict) -> tuple[str, str]:
    sentence = doc.get("swapped_sentence")
    if not isinstance(sentence, str):
        raise ValueError(f"KnowRef row has no swapped_sentence: {sentence!r}")
    words = sentence.split(" ")
    marked = [i for i, w in enumerate(words) if len(w) > 2 and w[0] == "[" and w[-1] == "]"]
    if len(marked) != 1:
        raise ValueError(f"KnowRef row needs exactly one [pronoun]: {doc['swapped_sentence']!r}")
    pronoun = words[marked[0]][1:-1]
    words[marked[0]] = pronoun
    return _detokenize(" ".join(words)), pronoun


def _candidates(doc: dict) -> list[str]:
    out = []
    for i in (0, 1):
        name = doc.get(f"candidate{i}", doc.get(f"candidate_{i}"))
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"KnowRef row has no candidate_{i} (or candidate{i}) name: {name!r}")
        out.append(name)
    return out


def doc_to_text(doc: dict) -> str:
    sentence, pronoun = _sentence_and_pronoun(doc)
    return f'{sentence}\nQuestion: In the sentence above, who does "{pronoun}" refer to?\nAnswer:'


def doc_to_choice(doc: dict) -> list[str]:
    return _candidates(doc)


def doc_to_target(doc: dict) -> int:
    gold = doc.get("correct_candidate")
    if gold not in _GOLD:
        raise ValueError(f"KnowRef row's correct_candidate must be 'candidate_0' or 'candidate_1', got {gold!r}")
    return _GOLD[gold]
