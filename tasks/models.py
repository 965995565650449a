"""Model runs: each trained model stored once in MLflow, registered, and loadable again.

A model run (tag kind=model) holds one (algorithm, seed[, target]) model: `weights.pt`, `setup.json`
(everything that rebuilds the learner: algorithm, hyperparameters, backbone, input shape, ways) and
`history.json` (its training curves). Evaluation runs refer to it by `model_run_id` and `model_uri`
instead of each carrying a copy. A rerun that reuses a cached training finds the model run holding
the same weights (tag `weights_digest`) and refers to it. Each new model run is registered in MLflow's
Model Registry under the study's name, with its algorithm and seed as tags; `read_saved_model` loads
one back from `runs:/<run id>` or `models:/<name>/<version>` (`adaptflow evaluate`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task

from adaptflow.errors import StudyError
from metalib import TrainingHistory
from tasks.caching import stable_token
from tasks.tracking import TRANSIENT_RETRIES, StudyRun, log_file, open_store, start_child_run
from tasks.train import LearnerSetup, TrainedModel

WEIGHTS, SETUP, HISTORY = "weights.pt", "setup.json", "history.json"


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
            torch.save(trained.state, Path(folder) / WEIGHTS)
            (Path(folder) / SETUP).write_text(json.dumps(asdict(setup), indent=1))
            (Path(folder) / HISTORY).write_text(
                json.dumps({**asdict(trained.history), "seconds": trained.seconds})
            )
            for name in (WEIGHTS, SETUP, HISTORY):
                log_file(client, run_id, Path(folder) / name)
        register(study, run_id, tags)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def register(study: StudyRun, run_id: str, tags: dict[str, str]) -> None:
    """A new version of the registered model named after the study (its experiment), for this run."""
    client = study.client
    name = client.get_experiment(study.experiment_id).name
    try:
        client.create_registered_model(name, description=f"models trained by study {name!r}")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = client.get_run(run_id).info.artifact_uri
    keep = ("algorithm", "algorithm_name", "seed", "target_domain")
    client.create_model_version(name, source, run_id, tags={k: v for k, v in tags.items() if k in keep})


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


@dataclass(frozen=True)
class SavedModel:
    """What a model run says about its model: the setup that rebuilds it, its seed and target."""

    run_id: str
    setup: LearnerSetup
    seed: int
    target: str | None  # the target domain it was trained for (dann), else None


def read_saved_model(model_uri: str, tracking_uri: str) -> SavedModel:
    """The model at `runs:/<model run id>` or `models:/<registered name>/<version>`; its weights are
    read by `load_trained`, a task."""
    client = open_store(tracking_uri)
    run_id = _model_run_id(client, model_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise StudyError(f"{model_uri}: no run {run_id} in {tracking_uri} ({exc.message})") from None
    if run.data.tags.get("kind") != "model" or run.info.status != "FINISHED":
        raise StudyError(
            f"{model_uri}: run {run_id} is not a finished model run (tag kind=model); give the "
            "`model_uri` tag of an evaluation run, or a version of the study's registered model"
        )
    setup = json.loads(_artifact(client, run_id, SETUP, model_uri))
    return SavedModel(
        run_id,
        LearnerSetup(**{**setup, "input_shape": tuple(setup["input_shape"])}),
        int(run.data.tags["seed"]),
        run.data.tags.get("target_domain"),
    )


@task(name="load-model", tags=["cpu"], **TRANSIENT_RETRIES)
def load_trained(tracking_uri: str, run_id: str) -> TrainedModel:
    """A model run's weights and training curves, as its training left them."""
    client = open_store(tracking_uri)
    saved = json.loads(_artifact(client, run_id, HISTORY, f"runs:/{run_id}"))
    with tempfile.TemporaryDirectory() as folder:
        state = torch.load(client.download_artifacts(run_id, WEIGHTS, folder), weights_only=True)
    resumed = int(client.get_run(run_id).data.tags.get("resumed_from_step", 0))
    return TrainedModel(state, TrainingHistory.from_dict(saved), saved["seconds"], resumed)


def _artifact(client: MlflowClient, run_id: str, name: str, model_uri: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        try:
            return Path(client.download_artifacts(run_id, name, folder)).read_text()
        except (MlflowException, OSError) as exc:
            raise StudyError(
                f"{model_uri}: model run {run_id} has no {name} ({exc}); it was logged by an older "
                "adaptflow: run its study again to save the model whole"
            ) from None


def _model_run_id(client: MlflowClient, model_uri: str) -> str:
    scheme, _, path = model_uri.partition(":/")
    parts = [part for part in path.split("/") if part]
    if scheme == "runs" and parts:
        return parts[0]
    if scheme == "models" and len(parts) == 2:
        try:
            return client.get_model_version(parts[0], parts[1]).run_id
        except MlflowException as exc:
            raise StudyError(f"{model_uri}: no such registered model version ({exc.message})") from None
    raise StudyError(
        f"{model_uri!r} is not a model URI: give runs:/<model run id> (an evaluation run's `model_uri` "
        "tag) or models:/<study name>/<version> (MLflow's Model Registry)"
    )
