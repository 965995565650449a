"""Model runs: each trained model's weights stored once in MLflow, and failed trainings recorded.

A model run (tag kind=model) holds `weights.pt` for one (algorithm, seed[, target]); evaluation runs
refer to it by `model_run_id` and `model_uri` instead of each carrying a copy. A rerun that reuses a
cached training finds the model run holding the same weights (tag `weights_digest`) and refers to it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch
from prefect import task

from tasks.caching import stable_token
from tasks.tracking import TRANSIENT_RETRIES, StudyRun, log_file, start_child_run
from tasks.train import LearnerSetup, TrainedModel

WEIGHTS = "weights.pt"


def model_uri(run_id: str) -> str:
    """Where the weights of a model run are: `mlflow.artifacts.download_artifacts(model_uri(...))`."""
    return f"runs:/{run_id}/{WEIGHTS}"


def model_tags(setup: LearnerSetup, seed: int, target: str | None) -> dict[str, str]:
    tags = {"kind": "model", "algorithm": setup.label, "algorithm_name": setup.algorithm, "seed": str(seed)}
    return {**tags, "target_domain": target} if target else tags


def model_name(setup: LearnerSetup, seed: int, target: str | None) -> str:
    return "·".join([setup.label, *([target] if target else []), f"seed{seed}", "model"])


@task(name="log-model", tags=["cpu"], **TRANSIENT_RETRIES)
def log_model(
    study: StudyRun, setup: LearnerSetup, trained: TrainedModel, seed: int, target: str | None
) -> str:
    """The id of the run holding this model's weights: a finished model run of the experiment with the
    same learner and weights if there is one, else a new one (a child of this study run)."""
    digest = hashlib.sha256(json.dumps(stable_token([setup, trained.state])).encode()).hexdigest()
    client = study.client
    found = client.search_runs(
        [study.experiment_id],
        f"tags.kind = 'model' and tags.weights_digest = '{digest}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    tags = {
        **model_tags(setup, seed, target),
        "weights_digest": digest,
        "resumed_from_step": str(trained.resumed_from),
    }
    run_id = start_child_run(study, model_name(setup, seed, target), tags)
    try:
        with tempfile.TemporaryDirectory() as folder:
            weights = Path(folder) / WEIGHTS
            torch.save(trained.state, weights)
            log_file(client, run_id, weights)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


@task(name="log-failed-training", tags=["cpu"], **TRANSIENT_RETRIES)
def log_failed_training(
    study: StudyRun, setup: LearnerSetup, seed: int, target: str | None, error: str
) -> str:
    """A FAILED model run whose `error` tag says why the training failed (for the MLflow UI and search)."""
    run_id = start_child_run(
        study, model_name(setup, seed, target), {**model_tags(setup, seed, target), "error": error[:5000]}
    )
    study.client.set_terminated(run_id, "FAILED")
    return run_id
