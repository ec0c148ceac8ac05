"""Paired significance of a method against its base on the same questions (pure functions).

Base and a method score the very same questions, so two independent stderrs overstate the
uncertainty of their difference; what matters are the questions that *flip*. Given aligned
boolean correctness vectors this module returns the flip counts, the exact McNemar p-value (a
two-sided binomial test of the wrong->right count among the discordant pairs, ``scipy.stats.binomtest``)
and a seeded paired-bootstrap percentile interval of the accuracy delta.

The bootstrap resamples questions with replacement. Per question the paired difference
``method - base`` is -1, 0 or +1, so resampling ``n`` questions is exactly a multinomial draw of
``n`` over those three counts: :func:`bootstrap_delta_interval` draws the counts instead of
``n`` indices, which is the same distribution at O(replicates) cost (MMLU's 14k questions x
10,000 replicates would otherwise be 140M draws). Several benchmarks (the table's average) are
resampled independently per benchmark (stratified) and averaged with equal weights, the way the
average column is formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

DEFAULT_REPLICATES = 10_000
DEFAULT_SEED = 0
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Flips:
    """Counts of one base-vs-method pairing: ``wrong_to_right`` (b) and ``right_to_wrong`` (c) are the
    discordant pairs McNemar's test looks at; ``both_right`` and ``both_wrong`` only enter ``n``."""

    n: int
    wrong_to_right: int
    right_to_wrong: int
    both_right: int
    both_wrong: int

    @property
    def base_correct(self) -> int:
        return self.both_right + self.right_to_wrong

    @property
    def method_correct(self) -> int:
        return self.both_right + self.wrong_to_right

    @property
    def delta(self) -> float:
        """Method accuracy minus base accuracy, as a fraction."""
        return (self.wrong_to_right - self.right_to_wrong) / self.n if self.n else 0.0


@dataclass(frozen=True)
class PairedStats:
    """Flips, the exact McNemar p-value and the bootstrap interval of the accuracy delta."""

    flips: Flips
    delta: float
    p_value: float
    ci_low: float
    ci_high: float


def _as_bool(values: Sequence[bool] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D correctness vector, got shape {array.shape}")
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans (or 0/1 values): a paired test needs right/wrong per question")
        array = array.astype(bool)
    return array


def count_flips(base: Sequence[bool] | np.ndarray, method: Sequence[bool] | np.ndarray) -> Flips:
    """The 2x2 table of two aligned correctness vectors (question i of ``base`` is question i of ``method``)."""
    b, m = _as_bool(base, "base"), _as_bool(method, "method")
    if b.shape != m.shape:
        raise ValueError(f"base has {b.size} questions but method has {m.size}; they must be aligned question by question")
    return Flips(
        n=int(b.size),
        wrong_to_right=int((~b & m).sum()),
        right_to_wrong=int((b & ~m).sum()),
        both_right=int((b & m).sum()),
        both_wrong=int((~b & ~m).sum()),
    )


def mcnemar_exact(wrong_to_right: int, right_to_wrong: int) -> float:
    """Two-sided exact McNemar p-value: under "no effect" each discordant pair is a fair coin.

    No discordant pair carries no evidence either way: p = 1.
    """
    discordant = wrong_to_right + right_to_wrong
    if discordant == 0:
        return 1.0
    return float(binomtest(wrong_to_right, discordant, 0.5, alternative="two-sided").pvalue)


def _replicate_deltas(flips: Flips, rng: np.random.Generator, replicates: int) -> np.ndarray:
    """Bootstrap replicates of one benchmark's delta: multinomial counts of (+1, -1, 0) differences."""
    if flips.n == 0:
        raise ValueError("no questions to resample")
    ties = flips.n - flips.wrong_to_right - flips.right_to_wrong
    probs = np.array([flips.wrong_to_right, flips.right_to_wrong, ties], dtype=float) / flips.n
    counts = rng.multinomial(flips.n, probs, size=replicates)
    return (counts[:, 0] - counts[:, 1]) / flips.n


def bootstrap_delta_interval(
    strata: Sequence[Flips], seed: int = DEFAULT_SEED, replicates: int = DEFAULT_REPLICATES,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile interval of the (equal-weight mean over ``strata`` of the) paired accuracy delta.

    One stratum is the plain paired bootstrap of one benchmark; several are resampled each on its
    own and averaged, like the table's average column. Deterministic for a ``seed``.
    """
    if not strata:
        raise ValueError("no benchmark to bootstrap")
    rng = np.random.default_rng(seed)
    mean = np.mean([_replicate_deltas(f, rng, replicates) for f in strata], axis=0)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(mean, [tail, 100 - tail])
    return float(low), float(high)


def paired_stats(
    base: Sequence[bool] | np.ndarray, method: Sequence[bool] | np.ndarray, seed: int = DEFAULT_SEED,
    replicates: int = DEFAULT_REPLICATES,
) -> PairedStats:
    """Everything the paired table shows for one benchmark."""
    flips = count_flips(base, method)
    return combine([flips], seed=seed, replicates=replicates)


def combine(strata: Sequence[Flips], seed: int = DEFAULT_SEED, replicates: int = DEFAULT_REPLICATES) -> PairedStats:
    """Paired statistics over benchmarks: delta and interval of the unweighted mean (as the table's
    average), flips summed, McNemar on the pooled discordant pairs (a test of "no question-level
    change", which the mean delta cannot be without it)."""
    total = Flips(
        n=sum(f.n for f in strata),
        wrong_to_right=sum(f.wrong_to_right for f in strata),
        right_to_wrong=sum(f.right_to_wrong for f in strata),
        both_right=sum(f.both_right for f in strata),
        both_wrong=sum(f.both_wrong for f in strata),
    )
    low, high = bootstrap_delta_interval(strata, seed=seed, replicates=replicates)
    return PairedStats(
        flips=total,
        delta=float(np.mean([f.delta for f in strata])),
        p_value=mcnemar_exact(total.wrong_to_right, total.right_to_wrong),
        ci_low=low,
        ci_high=high,
    )
