"""Question text of the planted-pathway benchmark (see :mod:`lm_eval_c3po.demo.planted`).

A small "people and cities" world: every person has four cities, one per
relation ("skill"): where they were born, where they work, where they studied
and where they spend their holidays.  A question asks for one relation of one
person in one of several paraphrases, and ends with an answer cue
(``Answer:`` or ``Reply:``).  The four choices are always the person's four
cities, so every wrong choice is "the answer to one of the other skills".

Everything here is pure Python and deterministic given the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# 40 first names (one word-level token each).  The first half are reference people,
# the second half test people, so the two splits never ask about the same person.
NAMES = [
    "Alice", "Bruno", "Clara", "Daniel", "Elena", "Felix", "Grace", "Hugo",
    "Irene", "Jonas", "Karen", "Lucas", "Maria", "Nathan", "Olga", "Pedro",
    "Quentin", "Rosa", "Simon", "Tanya", "Ulrich", "Vera", "Walter", "Xenia",
    "Yusuf", "Zoe", "Anton", "Bella", "Carlos", "Diana", "Emil", "Fiona",
    "Gustav", "Hannah", "Igor", "Julia", "Kevin", "Laura", "Marco", "Nina",
]

CITIES = [
    "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon",
    "Dublin", "Oslo", "Warsaw", "Athens", "Cairo", "Tokyo", "Lima", "Toronto",
]

SKILLS = ["birth", "work", "study", "holiday"]

# Paraphrases per skill.  Each carries several skill-specific words so that a
# sentence embedder groups questions by skill rather than by person.
TEMPLATES: dict[str, list[str]] = {
    "birth": [
        "{X} was born many years ago in a hospital. In which city was {X} born?",
        "Think about the day {X} came into the world as a newborn baby. Which city is the birthplace of {X}?",
        "The birth certificate of {X} names a city of birth. Where was {X} born?",
        "{X} often tells the story of being born. In what city did the birth of {X} take place?",
        "Which city is the hometown where {X} was born and spent the first days as a baby?",
        "Every birthday {X} remembers the city of birth. Where was {X} born?",
    ],
    "work": [
        "{X} commutes to the office every weekday. In which city does {X} work?",
        "The employer of {X} has its office in one city. Where does {X} have a job?",
        "Every morning {X} goes to work and earns a salary. In what city is the workplace of {X}?",
        "{X} works full time for a company. Which city is the office of {X} located in?",
        "Where does {X} work, the city of the job and the daily commute?",
        "The boss of {X} runs a business in one city. In which city is {X} employed?",
    ],
    "study": [
        "{X} went to university as a student. In which city did {X} study?",
        "The diploma of {X} comes from a university in one city. Where did {X} study?",
        "As a student {X} attended lectures and passed exams. In what city is the university of {X}?",
        "{X} earned a degree after years of study. Which city did {X} go to college in?",
        "Where did {X} study, the city of the campus and the student years?",
        "The professors of {X} taught classes at a university. In which city did {X} graduate?",
    ],
    "holiday": [
        "{X} loves summer vacations and travel. Which city does {X} visit on holiday?",
        "Every year {X} takes a vacation trip to the same place. Where does {X} spend the holidays?",
        "During the holidays {X} relaxes as a tourist. In what city does {X} go on vacation?",
        "{X} books a hotel for the annual holiday trip. Which city is the favourite holiday destination of {X}?",
        "Where does {X} travel for vacation, the city of the yearly holiday?",
        "The suitcase of {X} is packed for a holiday trip. To which city does {X} travel on vacation?",
    ],
}

# The answer cue that ends every context.  The planted router fault keys on it:
# a formatting detail that says nothing about what the question means.
CUE_CLEAN = "Answer:"
CUE_PLANTED = "Reply:"
CUES = [CUE_CLEAN, CUE_PLANTED]


@dataclass(frozen=True)
class World:
    """Who lives where: ``cities[name][skill]`` is the gold city of that relation."""

    cities: dict[str, dict[str, str]]


def make_world(seed: int) -> World:
    rng = random.Random(f"planted-world-{seed}")
    cities = {}
    for name in NAMES:
        picks = rng.sample(CITIES, len(SKILLS))  # four distinct cities per person
        cities[name] = dict(zip(SKILLS, picks))
    return World(cities)


def routed_skill(skill: int, template: int, decoys: int) -> int:
    """The skill a question is *about* (and routed as): its text's skill, except for decoy paraphrases.

    With ``decoys = d`` the last ``d`` paraphrases of every skill ask, despite
    their wording, for the skill two places on (``(s + 2) % 4``): text
    neighbours of a question then include references whose pathway (and gold
    answer) is another skill's. ``decoys = 0`` is the plain benchmark.
    """
    n = len(TEMPLATES[SKILLS[skill]])
    return (skill + 2) % len(SKILLS) if template >= n - decoys else skill


def all_instances(world: World, seed: int, names: list[str], decoys: int = 0) -> list[dict]:
    """Every (person, skill, paraphrase, cue) question about ``names`` as an lm-eval doc."""
    docs = []
    for name in names:
        for text_idx, text_skill in enumerate(SKILLS):
            for t_idx, template in enumerate(TEMPLATES[text_skill]):
                s_idx = routed_skill(text_idx, t_idx, decoys)
                skill = SKILLS[s_idx]
                for c_idx, cue in enumerate(CUES):
                    question = template.format(X=name)
                    rng = random.Random(f"planted-choices-{seed}-{name}-{text_skill}-{t_idx}-{c_idx}")
                    choices = [world.cities[name][s] for s in SKILLS]
                    rng.shuffle(choices)
                    gold_city = world.cities[name][skill]
                    docs.append(
                        {
                            "id": f"{name}-{text_skill}-{t_idx}-{c_idx}",
                            "question": question,
                            "context": f"{question}\n{cue}",
                            "choices": choices,
                            "gold": choices.index(gold_city),
                            "skill": skill,
                            "skill_index": s_idx,
                            "person": name,
                            "template": t_idx,
                            "cue": cue,
                            "planted": bool(c_idx == 1),
                            **({"decoy": s_idx != text_idx} if decoys else {}),
                        }
                    )
    return docs


def make_splits(
    world: World, seed: int, n_ref: int, n_test: int, decoys: int = 0
) -> tuple[list[dict], list[dict]]:
    """Reference and test docs: disjoint people, stratified over skill x cue.

    Decoy paraphrases (see :func:`routed_skill`) are asked only in the
    reference split: they are the retrieval noise, not test questions.
    """
    half = len(NAMES) // 2
    ref_pool = all_instances(world, seed, NAMES[:half], decoys)
    test_pool = [d for d in all_instances(world, seed, NAMES[half:], decoys) if not d.get("decoy")]

    def draw(pool: list[dict], n: int, tag: str) -> list[dict]:
        if n > len(pool):
            raise ValueError(f"asked for {n} {tag} questions but only {len(pool)} exist")
        rng = random.Random(f"planted-split-{tag}-{seed}")
        strata: dict[tuple, list[dict]] = {}
        for d in pool:
            strata.setdefault((d["skill"], d["cue"]), []).append(d)
        keys = sorted(strata)
        for k in keys:
            rng.shuffle(strata[k])
        out: list[dict] = []
        i = 0
        while len(out) < n:  # round-robin over strata keeps skills and cues balanced
            k = keys[i % len(keys)]
            j = i // len(keys)
            if j < len(strata[k]):
                out.append(strata[k][j])
            i += 1
        rng.shuffle(out)
        return out

    return draw(ref_pool, n_ref, "ref"), draw(test_pool, n_test, "test")


def corpus_words() -> list[str]:
    """Every word the tokenizer must know (word-level vocabulary)."""
    import re

    text = " ".join(
        [" ".join(NAMES), " ".join(CITIES), " ".join(CUES)]
        + [t for ts in TEMPLATES.values() for t in ts]
    )
    words = set(re.findall(r"\w+|[^\w\s]+", text.replace("{X}", "")))
    return sorted(words)
