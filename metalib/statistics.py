"""Statistics for few-shot comparisons in which the training run (seed) is the unit of replication.

Each seed trains its own model and meets its own evaluation episodes, so episodes are nested in
seeds: thousands of episodes from three models are three replicates, not thousands. Intervals and
tests here therefore work on per-seed means (a balanced nested design analysed through its cell
means, which is exact for equal episode counts per seed), and fall back to episode-level noise only
where there is a single seed, saying so.

scipy is imported where it is used: `metalib` loads this module, and a spec check that needs only
the learner registry should not pay scipy's import (about 0.7 s).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_SEEDS_TO_TEST = 3  # fewer shared seeds than this: no p-value, "too few seeds to test"
SEED_METHOD = "t interval over per-seed means (df = seeds - 1)"
ONE_SEED_METHOD = "one seed: normal interval over its episodes (evaluation noise only)"
PAIRED_METHOD = "paired t over per-seed mean differences (df = seeds - 1)"
Accuracies = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class Interval:
    """A mean with the half-width of its 95% interval, the method that gave it and how many seeds."""

    mean: float
    half_width: float
    method: str
    seeds: int


@dataclass(frozen=True)
class PairedTest:
    """Mean difference a - b over shared seeds, its 95% interval, and a p-value (None: too few seeds)."""

    difference: float
    half_width: float
    p_value: float | None
    seeds: int
    method: str


def episode_half_width(accuracies: Accuracies, confidence: float = 0.95) -> float:
    """The per-model interval papers report: z * std / sqrt(episodes) over one model's episodes."""
    values = np.asarray(accuracies, dtype=np.float64)
    if len(values) < 2:
        return 0.0
    from scipy.special import ndtri  # stats.norm.ppf's own function: scipy.stats takes ~0.5 s to import

    return float(ndtri(0.5 + confidence / 2) * values.std(ddof=1) / math.sqrt(len(values)))


def mean_ci95(accuracies: Accuracies) -> tuple[float, float]:
    """One model's mean episode accuracy and its per-model 95% interval (`episode_half_width`)."""
    values = np.asarray(accuracies, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("no episodes to summarise")
    return float(values.mean()), episode_half_width(values)


def t_half_width(values: np.ndarray, confidence: float = 0.95) -> float:
    """Half-width of the t interval of the mean of `values` (nan for fewer than 2)."""
    if len(values) < 2:
        return float("nan")
    from scipy.special import stdtrit  # stats.t.ppf's own function, as in episode_half_width

    return float(stdtrit(len(values) - 1, 0.5 + confidence / 2) * values.std(ddof=1) / math.sqrt(len(values)))


def seed_interval(per_seed: Sequence[Accuracies], confidence: float = 0.95) -> Interval:
    """Mean accuracy of a cell and its seed-aware interval.

    `per_seed` holds one array of episode accuracies per seed. The mean is the mean of the seed
    means; its interval is a t interval over the seed means, whose spread contains both the
    training variation and each seed's evaluation noise. With one seed there is no training
    variation to measure: the interval is that seed's episode interval, and says so.
    """
    if not per_seed or any(len(episodes) == 0 for episodes in per_seed):
        raise ValueError("every seed needs at least one evaluated episode")
    means = np.array([np.mean(episodes) for episodes in per_seed], dtype=np.float64)
    if len(means) == 1:
        return Interval(float(means[0]), episode_half_width(per_seed[0], confidence), ONE_SEED_METHOD, 1)
    return Interval(float(means.mean()), t_half_width(means, confidence), SEED_METHOD, len(means))


def paired_difference(
    a_per_seed: Sequence[Accuracies], b_per_seed: Sequence[Accuracies], confidence: float = 0.95
) -> PairedTest:
    """a - b where a and b met the same episodes within each seed (seed i of a pairs with seed i of b).

    Differences are averaged within each seed first, then tested across seeds with a one-sample t
    test: the seeds are the replicates. Below MIN_SEEDS_TO_TEST seeds the p-value is None.
    """
    if len(a_per_seed) != len(b_per_seed) or not a_per_seed:
        raise ValueError(f"need the same seeds on both sides, got {len(a_per_seed)} and {len(b_per_seed)}")
    differences = []
    for a, b in zip(a_per_seed, b_per_seed):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"paired seeds must have the same episodes, got {a.shape} and {b.shape}")
        differences.append((a - b).mean())
    values = np.array(differences)
    seeds = len(values)
    if seeds < MIN_SEEDS_TO_TEST:
        return PairedTest(float(values.mean()), t_half_width(values, confidence), None, seeds, PAIRED_METHOD)
    return PairedTest(
        float(values.mean()), t_half_width(values, confidence), one_sample_p(values), seeds, PAIRED_METHOD
    )


def one_sample_p(values: np.ndarray) -> float:
    """Two-sided p of a one-sample t test of mean zero; 1 for all-zero values, 0 for a constant non-zero."""
    if np.all(values == values[0]):
        return 1.0 if values[0] == 0 else 0.0
    from scipy import stats

    return float(stats.ttest_1samp(values, 0.0).pvalue)


def wilcoxon_p(differences: Accuracies) -> float | None:
    """Two-sided Wilcoxon signed-rank p over per-cell mean differences; None if all are 0 or < 2 cells."""
    values = np.asarray(differences, dtype=np.float64)
    if len(values) < 2 or np.all(values == 0):
        return None
    from scipy import stats

    return float(stats.wilcoxon(values).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone), in the order given."""
    order = np.argsort(p_values, kind="stable")
    count = len(p_values)
    adjusted = [0.0] * count
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (count - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def tied_ranks(means: Sequence[float], standard_errors: Sequence[float], z: float = 1.96) -> list[float]:
    """Ranks (1 = best) where two methods tie unless their means differ by more than
    z * sqrt(se1^2 + se2^2) (Meta-Dataset's rule); a method's rank is 1 + the number of methods
    clearly better + half the number tied with it, so clear orders give 1..k and ties share."""
    ranks = []
    for i, (mean_i, se_i) in enumerate(zip(means, standard_errors)):
        better = tied = 0
        for j, (mean_j, se_j) in enumerate(zip(means, standard_errors)):
            if i == j:
                continue
            if abs(mean_j - mean_i) <= z * math.hypot(se_i, se_j):
                tied += 1
            elif mean_j > mean_i:
                better += 1
        ranks.append(1 + better + tied / 2)
    return ranks


@dataclass(frozen=True)
class Friedman:
    """Friedman's test over cells (blocks) x algorithms, and the Nemenyi critical difference of mean ranks."""

    statistic: float
    p_value: float
    critical_difference: float
    mean_ranks: dict[str, float]
    cells: int


def friedman_nemenyi(accuracy: dict[str, Sequence[float]], alpha: float = 0.05) -> Friedman:
    """Demsar (2006): ranks within each cell (1 = best, average ranks for exact ties), Friedman's
    chi-square over cells, and the Nemenyi critical difference q_alpha * sqrt(k (k+1) / 6N).

    `accuracy` maps each algorithm to its accuracy in the same N cells (same order).
    """
    names = list(accuracy)
    matrix = np.array([accuracy[name] for name in names], dtype=np.float64).T  # cells x algorithms
    cells, k = matrix.shape
    if k < 3 or cells < 2:
        raise ValueError(
            f"Friedman's test needs 3 or more algorithms and 2 or more cells, got {k} and {cells}"
        )
    from scipy import stats

    statistic, p_value = stats.friedmanchisquare(*matrix.T)
    ranks = stats.rankdata(-matrix, axis=1).mean(axis=0)
    q_alpha = stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    critical = float(q_alpha * math.sqrt(k * (k + 1) / (6 * cells)))
    return Friedman(float(statistic), float(p_value), critical, dict(zip(names, map(float, ranks))), cells)


def simulate_pair(
    rng: np.random.Generator,
    *,
    seeds: int,
    episodes: int,
    queries: int,
    accuracy: float,
    effect: float = 0.0,
    seed_sd: float,
    episode_sd: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-episode accuracies [seeds, episodes] of two algorithms from a two-level model, for checking
    (and planning the power of) the tests above.

    Each seed trains its own model of each algorithm: a seed effect ~ N(0, seed_sd) per algorithm and
    seed. Both algorithms meet the same episodes in a seed: an episode difficulty ~ N(0, episode_sd)
    shared by the two. An episode's accuracy is then the fraction right of `queries` queries, each
    right with that probability (binomial). `effect` is added to the second algorithm.
    """
    difficulty = rng.normal(0.0, episode_sd, (seeds, episodes))
    pair = []
    for shift in (0.0, effect):
        probability = accuracy + shift + rng.normal(0.0, seed_sd, (seeds, 1)) + difficulty
        pair.append(rng.binomial(queries, np.clip(probability, 0.0, 1.0)) / queries)
    return pair[0], pair[1]
