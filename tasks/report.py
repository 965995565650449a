"""Report: a child MLflow run per evaluation, and the study's results table."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from adaptflow.spec import StudySpec, applicable_params
from tasks.changes import report_changes
from tasks.evaluate import Evaluation
from tasks.models import ModelRef
from tasks.summary import interval_caption, summarise
from tasks.tables import accuracy_table, fit_to_terminal, terminal_width, to_markdown
from tasks.tracking import (
    MLFLOW_WRITES,
    StudyRun,
    ended_on_failure,
    log_file,
    log_flat,
    log_yaml,
    start_child_run,
)
from tasks.train import LearnerSetup, TrainedModel

EPISODES_ARTIFACT = "episode_accuracies.json"  # per-episode accuracies, for paired comparisons
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (markdown)
MAX_NOTE_LENGTH = 8000  # MLflow's limit on a tag's value
CUT = "\n\n… (cut here: the full table is in results.csv)\n"


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
    train_seconds: float  # of the execution that trained the model (a cached rerun reports that one's)
    eval_seconds: float


@task(name="log-evaluation", tags=["cpu"], **MLFLOW_WRITES)
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
    modality: str,
    cached: bool,
    model: ModelRef,
    search_tags: dict[str, str] | None = None,
) -> Result:
    """A child run with the tags, params, metrics and artifacts a comparison needs.

    Params and metrics come last, in one call: a run with `acc` has all its artifacts, and a run that
    fails on the way ends FAILED (KILLED if interrupted). The weights stay in the logged model
    (`model_run_id`, `model_uri` tags), and the training curves in its model run, each stored once.
    """
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
        "episodes_digest": evaluation.episodes_digest,
        "normalisation": evaluation.normalisation,
        "hparams_origin": "spec",  # or, for a searched configuration, "search" and the search's tags
        **(search_tags or {}),
    }
    client = study.client
    run_id = start_child_run(study, name, {**tags, "model_run_id": model.run_id, "model_uri": model.uri})
    with ended_on_failure(client, run_id):
        log_yaml(client, run_id, spec.model_dump(mode="json"), "spec.yaml")
        with tempfile.TemporaryDirectory() as folder:
            episodes = Path(folder) / EPISODES_ARTIFACT
            episodes.write_text(json.dumps(evaluation.accuracies.tolist()))
            log_file(client, run_id, episodes)
        log_flat(
            client,
            run_id,
            params={
                **applicable_params(spec, modality, one_algorithm=True),
                **{f"hparams.{k}": v for k, v in setup.resolved_hparams().items()},
            },
            metrics={
                "acc": evaluation.acc,
                "acc_ci95": evaluation.acc_ci95,
                "source_val_acc": trained.history.best_val_acc,
                "best_step": trained.history.best_step,
                "train_seconds": trained.seconds,
                "eval_seconds": evaluation.seconds,
            },
        )
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
        trained.seconds,
        evaluation.seconds,
    )


def format_table(summary: pd.DataFrame, markdown: bool = False) -> str:
    """Algorithms as rows, target x shots as columns, cells 'acc ± ci' in percent. Text wider than the
    terminal (many targets) is laid out with one row per target and algorithm, shots as columns."""
    table = accuracy_table(summary, ["algorithm", "target", "shots"])
    if markdown:
        return to_markdown(table, "algorithm")
    text = table.to_string()
    if max(map(len, text.splitlines())) <= terminal_width():
        return text
    targets = list(dict.fromkeys(summary.target))
    by_target = summary.iloc[summary.target.map(targets.index).argsort(kind="stable")]
    rows = by_target.assign(row=by_target.target + " · " + by_target.algorithm)
    return fit_to_terminal(accuracy_table(rows, ["row", "shots"]))


@task(name="report", tags=["cpu"], cache_policy=NO_CACHE)
def report_study(study: StudyRun, spec: StudySpec, results: list[Result]) -> pd.DataFrame:
    """Logs the per-run and summary tables to the parent run, the summary as its metrics and
    description (so the answer is on the study's own MLflow page), and posts a Prefect artifact; then
    posts what moved since the previous run of the same spec (tasks/changes.py)."""
    runs = pd.DataFrame([vars(result) for result in results])
    summary = summarise(runs)
    per_run = runs.drop(columns="accuracies")
    with tempfile.TemporaryDirectory() as folder:
        for frame, name in ((summary, "results.csv"), (per_run, "runs.csv")):
            path = Path(folder) / name
            frame.to_csv(path, index=False)
            log_file(study.client, study.run_id, path)
    caption = f"{spec.protocol()}: {interval_caption(summary)}."
    markdown = f"## {spec.name}\n\n{caption}\n\n{format_table(summary, markdown=True)}\n"
    log_flat(study.client, study.run_id, metrics=summary_metrics(summary), tags={NOTE_TAG: note(markdown)})
    create_markdown_artifact(
        markdown=markdown, key="study-results", description=f"results of study {spec.name}"
    )
    report_changes(study, spec, summary, per_run)
    return summary


def summary_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """The study's answer as metrics of its parent run, `acc/<algorithm>/<target>/<shots>shot`: MLflow
    groups charts by the prefix before the first `/`, and the run page lists them with the run."""
    return {f"acc/{row.algorithm}/{row.target}/{row.shots}shot": row.acc for row in summary.itertuples()}


def note(markdown: str) -> str:
    """The parent run's MLflow description, cut to fit a tag (8,000 characters) on a very wide table."""
    if len(markdown) <= MAX_NOTE_LENGTH:
        return markdown
    return markdown[: MAX_NOTE_LENGTH - len(CUT)] + CUT
