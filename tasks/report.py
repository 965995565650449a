"""Report: a child MLflow run per evaluation, and the study's results table."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact

from adaptflow.spec import StudySpec, flatten
from tasks.evaluate import Evaluation
from tasks.plots import learning_curve
from tasks.tables import accuracy_table, to_markdown
from tasks.tracking import StudyRun, log_file, log_flat, log_yaml, start_child_run
from tasks.train import LearnerSetup, TrainedModel

EPISODES_ARTIFACT = "episode_accuracies.json"  # per-episode accuracies, for paired comparisons


@dataclass(frozen=True)
class Result:
    """One evaluated (algorithm, seed, target, shots), as reported."""

    algorithm: str
    seed: int
    target: str
    shots: int
    acc: float
    acc_ci95: float
    source_val_acc: float
    accuracies: torch.Tensor
    run_id: str
    cached: bool


@task(name="log-evaluation", tags=["cpu"])
def log_evaluation(
    study: StudyRun,
    spec: StudySpec,
    setup: LearnerSetup,
    trained: TrainedModel,
    evaluation: Evaluation,
    *,
    seed: int,
    target: str,
    shots: int,
    flow_run_id: str,
    cached: bool,
) -> Result:
    """A child run with the tags, params, metrics and artifacts a comparison needs."""
    name = f"{setup.label}·{target}·{shots}shot·seed{seed}"
    tags = {
        "kind": "evaluation",
        "algorithm": setup.label,
        "algorithm_name": setup.algorithm,
        "source_domains": ",".join(spec.source),
        "target_domain": target,
        "ways": str(setup.ways),
        "shots": str(shots),
        "seed": str(seed),
        "prefect_flow_run_id": flow_run_id,
        "reused_cached_results": str(cached).lower(),
        "model_selection": "best source-validation accuracy",
    }
    client = study.client
    run_id = start_child_run(study, name, tags)
    params = {**flatten(spec), **{f"hparams.{k}": v for k, v in setup.resolved_hparams().items()}}
    log_flat(
        client,
        run_id,
        params=params,
        metrics={
            "acc": evaluation.acc,
            "acc_ci95": evaluation.acc_ci95,
            "source_val_acc": trained.history.best_val_acc,
            "best_step": trained.history.best_step,
            "train_seconds": trained.seconds,
            "eval_seconds": evaluation.seconds,
        },
        curves=trained.history.curves,
    )
    log_yaml(client, run_id, spec.model_dump(mode="json"), "spec.yaml")
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "weights.pt"
        torch.save(trained.state, weights)
        log_file(client, run_id, weights)
        episodes = Path(folder) / EPISODES_ARTIFACT
        episodes.write_text(json.dumps(evaluation.accuracies.tolist()))
        log_file(client, run_id, episodes)
        curve = learning_curve(
            trained.history.curves, trained.history.best_step, name, Path(folder) / "learning_curve.png"
        )
        log_file(client, run_id, curve)
    client.set_terminated(run_id, "FINISHED")
    return Result(
        setup.label,
        seed,
        target,
        shots,
        evaluation.acc,
        evaluation.acc_ci95,
        trained.history.best_val_acc,
        evaluation.accuracies,
        run_id,
        cached,
    )


def summarise(runs: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Accuracy per group of runs (default algorithm x target x shots): the mean over all
    episodes of all seeds, its 95% CI, and the spread of the per-seed means.

    `runs` has one row per evaluation with `acc` and its per-episode `accuracies`.
    """
    by = by or ["algorithm", "target", "shots"]
    rows = []
    for key, members in runs.groupby(by, sort=False):
        episodes = torch.cat(list(members.accuracies)).double()
        seed_means = torch.tensor(list(members.acc), dtype=torch.float64)
        rows.append(
            {
                **dict(zip(by, key)),
                "acc": episodes.mean().item(),
                "ci95": 1.96 * episodes.std().item() / math.sqrt(len(episodes)),
                "seed_std": seed_means.std().item() if len(members) > 1 else 0.0,
                "runs": len(members),
                "episodes": len(episodes),
            }
        )
    return pd.DataFrame(rows)


def format_table(summary: pd.DataFrame, markdown: bool = False) -> str:
    """Algorithms as rows, target x shots as columns, cells 'acc ± ci' in percent."""
    table = accuracy_table(summary, ["algorithm", "target", "shots"])
    return to_markdown(table, "algorithm") if markdown else table.to_string()


@task(name="report", tags=["cpu"])
def report_study(study: StudyRun, spec: StudySpec, results: list[Result]) -> pd.DataFrame:
    """Logs the per-run and summary tables to the parent run and posts a Prefect artifact."""
    runs = pd.DataFrame([vars(result) for result in results])
    summary = summarise(runs)
    per_run = runs.drop(columns="accuracies")
    with tempfile.TemporaryDirectory() as folder:
        for frame, name in ((summary, "results.csv"), (per_run, "runs.csv")):
            path = Path(folder) / name
            frame.to_csv(path, index=False)
            log_file(study.client, study.run_id, path)
    caption = (
        f"{spec.episodes.ways}-way, {spec.episodes.queries} queries, {spec.episodes.eval_episodes} "
        f"target episodes per seed, seeds {spec.seeds}: accuracy % ± 95% CI over all episodes."
    )
    create_markdown_artifact(
        markdown=f"## {spec.name}\n\n{caption}\n\n{format_table(summary, markdown=True)}\n",
        key="study-results",
        description=f"results of study {spec.name}",
    )
    return summary
