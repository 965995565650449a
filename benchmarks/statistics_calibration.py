"""Calibration of the comparison statistics: false-positive rate and power, by simulation.

Simulates many comparisons of two algorithms from metalib.statistics.simulate_pair's two-level
model (seed effect + shared episode difficulty + binomial query noise) and counts how often each
test rejects at alpha = 0.05:
- paired t over per-seed mean differences (what `adaptflow compare` uses),
- a paired hierarchical bootstrap (resample seeds, then episodes within each seed; percentile CI),
- the pooled-episode paired t test that adaptflow used before (every episode of every seed a pair).

The model's magnitudes default to those estimated from our own runs (docs/statistics.md says
which); `--experiment NAME --tracking-uri URI` estimates them from an MLflow experiment instead.

    .venv/bin/python benchmarks/statistics_calibration.py [--simulations 2000]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
from scipy import stats

from metalib.statistics import paired_difference, simulate_pair

ALPHA = 0.05
TESTS = ("paired t over seeds", "hierarchical bootstrap", "pooled-episode t")


def hierarchical_bootstrap_p(
    a: np.ndarray, b: np.ndarray, rng: np.random.Generator, resamples: int = 1000
) -> float:
    """Two-sided bootstrap p: twice the smaller tail of the resampled mean difference around zero."""
    differences = a - b
    seeds, episodes = differences.shape
    pick_seeds = rng.integers(0, seeds, (resamples, seeds))
    pick_episodes = rng.integers(0, episodes, (resamples, seeds, episodes))
    resampled = differences[pick_seeds[..., None], pick_episodes].mean(axis=(1, 2))
    tail = min((resampled <= 0).mean(), (resampled >= 0).mean())
    return float(min(1.0, 2 * tail))


def rejection_rates(
    simulations: int, *, seeds: int, effect: float, model: dict[str, float], rng: np.random.Generator
) -> dict[str, float]:
    rejected = dict.fromkeys(TESTS, 0)
    for _ in range(simulations):
        a, b = simulate_pair(rng, seeds=seeds, effect=effect, **model)
        rejected["paired t over seeds"] += paired_difference(list(a), list(b)).p_value < ALPHA
        rejected["hierarchical bootstrap"] += hierarchical_bootstrap_p(a, b, rng) < ALPHA
        rejected["pooled-episode t"] += stats.ttest_rel(a.ravel(), b.ravel()).pvalue < ALPHA
    return {name: count / simulations for name, count in rejected.items()}


def estimate_model(experiment: str, tracking_uri: str, baseline: str) -> dict[str, float]:
    """Seed sd (spread of per-seed means beyond their episode noise) and episode difficulty sd
    (covariance of two algorithms' accuracies on the same episodes), pooled over the experiment's cells."""
    from mlflow.tracking import MlflowClient

    from tasks.compare import CELL, load_runs

    runs = load_runs(MlflowClient(tracking_uri=tracking_uri), experiment)
    seed_vars, covariances, accuracies = [], [], []
    for _, members in runs.groupby(["algorithm", *CELL]):
        per_seed = [np.asarray(x) for x in members.accuracies]
        means = np.array([x.mean() for x in per_seed])
        noise = np.mean([x.var(ddof=1) / len(x) for x in per_seed])
        seed_vars.append(max(0.0, means.var(ddof=1) - noise))
        accuracies.append(means.mean())
    reference = runs[runs.algorithm == baseline].set_index([*CELL, "seed"]).accuracies
    for _, row in runs[runs.algorithm != baseline].iterrows():
        other = np.asarray(reference[(row.source_domains, row.target, row.shots, row.seed)])
        covariances.append(np.cov(np.asarray(row.accuracies), other)[0, 1])
    return {
        "seed_sd": float(np.sqrt(np.mean(seed_vars))),
        "episode_sd": float(np.sqrt(max(0.0, np.mean(covariances)))),
        "accuracy": float(np.mean(accuracies)),
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--simulations", type=int, default=2000)
    parser.add_argument("--experiment", help="estimate the model's magnitudes from this MLflow experiment")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--baseline", default="finetune")
    parser.add_argument("--seed-sd", type=float, default=0.022)
    parser.add_argument("--episode-sd", type=float, default=0.10)
    parser.add_argument("--accuracy", type=float, default=0.57)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--queries", type=int, default=15, help="per episode (ways x per class)")
    args = parser.parse_args()
    model = {"seed_sd": args.seed_sd, "episode_sd": args.episode_sd, "accuracy": args.accuracy}
    if args.experiment:
        model = estimate_model(args.experiment, args.tracking_uri, args.baseline)
    print(
        f"two-level model: accuracy {model['accuracy']:.3f}, seed sd {model['seed_sd']:.4f}, episode "
        f"difficulty sd {model['episode_sd']:.4f}, {args.episodes} episodes of {args.queries} queries "
        "per seed; "
        f"{args.simulations} simulations per row, alpha {ALPHA}"
    )
    print("| seeds | true difference (points) | " + " | ".join(TESTS) + " |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for seeds, effect in itertools.product((3, 5, 10), (0.0, 0.02, 0.05)):
        rates = rejection_rates(
            args.simulations,
            seeds=seeds,
            effect=effect,
            model={**model, "episodes": args.episodes, "queries": args.queries},
            rng=rng,
        )
        cells = " | ".join(f"{rate:.3f}" for rate in rates.values())
        print(f"| {seeds} | {100 * effect:.0f} | {cells} |")


if __name__ == "__main__":
    main()
