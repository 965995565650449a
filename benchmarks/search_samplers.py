"""TPE against random search at equal budget: the best source-validation score after each trial.

Runs the search's own pieces (tasks/search.py: spaces, folds, trials, Optuna storage) without
Prefect, on one learner of a study spec, once per sampler and sampler seed, and prints the mean (and
range over seeds) of the best score found after 1, 2, ... trials. No pruning, so both samplers
spend the same training steps. Reads data/ only.

    .venv/bin/python benchmarks/search_samplers.py --algorithm finetune --trials 16 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402

from adaptflow.spec import load_spec  # noqa: E402
from tasks.prepare import prepare  # noqa: E402
from tasks.search import ask, folds, open_search, run_trial, tell, with_params  # noqa: E402
from tasks.train import LearnerSetup  # noqa: E402


def best_so_far(
    spec_path: str, algorithm: str, sampler: str, seed: int, trials: int, storage: str
) -> list[float]:
    spec = load_spec(
        spec_path,
        [
            f"algorithms=[{{name: {algorithm}}}]",
            f"search={{trials: {trials}, sampler: {sampler}, pruner: none, seed: {seed}}}",
        ],
    )
    prepared = prepare(spec.data, spec.source, spec.target)
    setup = LearnerSetup.from_spec(spec, spec.algorithms[0], prepared)
    space = spec.search_space(spec.algorithms[0])
    key = f"{algorithm}/{sampler}/{seed}"
    study = open_search(spec.search, storage, key, space)
    trial_folds = folds(spec.search, spec, prepared)
    scores = []
    for _ in range(trials):
        trial = ask(study, space)
        outcome = run_trial.fn(
            spec.search, storage, key, trial._trial_id, with_params(setup, trial.params), trial_folds,
            spec.train, spec.train_shots, spec.episodes.queries, seed,
        )  # fmt: skip
        tell(study, trial, outcome)
        scores.append(outcome.score if outcome.score is not None else -np.inf)
    return list(np.maximum.accumulate(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="studies/office_caltech_search.yaml")
    parser.add_argument("--algorithm", default="finetune")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--plot", default="benchmarks/results/search_samplers.png")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    curves: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        storage = f"sqlite:///{Path(folder) / 'optuna.db'}"
        for sampler in ("tpe", "random"):
            curves[sampler] = np.array(
                [
                    best_so_far(args.spec, args.algorithm, sampler, seed, args.trials, storage)
                    for seed in args.seeds
                ]
            )
            print(f"{sampler}: done after {time.perf_counter() - started:.0f} s", flush=True)
    print(
        f"\n{args.algorithm}, {args.trials} trials, sampler seeds {args.seeds}: "
        "best source-validation accuracy"
    )
    print("after n trials: mean [min, max] over seeds")
    print(f"{'n':>3}  {'tpe':>22}  {'random':>22}")
    for n in range(args.trials):
        cells = [f"{c[:, n].mean():.3f} [{c[:, n].min():.3f}, {c[:, n].max():.3f}]" for c in curves.values()]
        print(f"{n + 1:>3}  {cells[0]:>22}  {cells[1]:>22}")
    figure, axes = plt.subplots(figsize=(6, 3.6))
    for sampler, curve in curves.items():
        trials = np.arange(1, args.trials + 1)
        axes.plot(
            trials, curve.mean(0), marker="o", markersize=3, label=f"{sampler} (mean of {len(args.seeds)})"
        )
        axes.fill_between(trials, curve.min(0), curve.max(0), alpha=0.2)
    axes.set_xlabel("trials")
    axes.set_ylabel("best source-validation accuracy")
    axes.set_title(f"{args.algorithm}: TPE vs random search, equal budget")
    axes.legend()
    figure.savefig(args.plot, dpi=110, bbox_inches="tight")
    print(f"\nplot: {args.plot}; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
