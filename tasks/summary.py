"""One summary of evaluated runs, shared by the run's report and `adaptflow compare`.

Each run is one trained model (a seed) with its own evaluation episodes; the summary treats runs as
the replicates and episodes as nested in them (metalib.statistics).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from metalib.statistics import ONE_SEED_METHOD, episode_half_width, seed_interval

KEYS = ["algorithm", "target", "shots"]


def summarise(runs: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Accuracy per group of runs (default algorithm x target x shots).

    `runs` has one row per evaluation with its `seed` and per-episode `accuracies`. A seed is one
    replicate: where a group holds several runs of one seed (grouping without target or shots, or
    runs from several source sets), their episodes are pooled into that seed's one mean. Each group
    gets the mean of its seed means (`acc`), the seed-aware 95% interval (`ci95`, method in
    `ci_method`), the conventional per-model episode interval as papers report it, averaged over
    the runs (`episode_ci95`), the spread of the seed means (`seed_std`) and the counts.
    """
    by = by or KEYS
    rows = []
    for key, members in runs.groupby(by, sort=False):
        runs_episodes = [np.asarray(accuracies, dtype=np.float64) for accuracies in members.accuracies]
        per_seed = [
            np.concatenate([np.asarray(a, dtype=np.float64) for a in seed_runs.accuracies])
            for _, seed_runs in members.groupby("seed", sort=True)
        ]
        interval = seed_interval(per_seed)
        means = np.array([episodes.mean() for episodes in per_seed])
        rows.append(
            {
                **dict(zip(by, key if isinstance(key, tuple) else (key,))),
                "acc": interval.mean,
                "ci95": interval.half_width,
                "ci_method": interval.method,
                "episode_ci95": sum(map(episode_half_width, runs_episodes)) / len(runs_episodes),
                "seed_std": float(means.std(ddof=1)) if len(means) > 1 else 0.0,
                "seeds": len(per_seed),
                "runs": len(members),
                "episodes": sum(len(episodes) for episodes in runs_episodes),
            }
        )
    return pd.DataFrame(rows)


def interval_caption(summary: pd.DataFrame) -> str:
    """Says which interval the table's ± shows, and warns when it covers evaluation noise only."""
    methods = sorted(set(summary.ci_method))
    text = "accuracy % ± 95% CI, " + "; ".join(methods)
    if ONE_SEED_METHOD in methods:
        text += (
            ". With one seed the interval leaves out training variation: run more seeds to compare algorithms"
        )
    return text
