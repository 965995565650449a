"""Model runs: each trained model stored once in MLflow as a logged model, registered, loadable again.

A model run (tag kind=model) holds one (algorithm, seed[, target]) training's curves (a training curve
of more than 320 steps as that many means of consecutive steps, `tasks.tracking.binned`), summary metrics
and `learning_curve.png`, and produces its model: an MLflow logged model
(MLflow 3's `LoggedModel`, listed in the run's "Models" column and the experiment's Models tab) whose
artifacts are `weights.pt`, `setup.json` (everything that rebuilds the learner: algorithm,
hyperparameters, backbone, input shape, ways) and `history.json` (its training curves). Evaluation runs
refer to it by `model_run_id` and `model_uri` (`models:/<model id>`) instead of each carrying a copy. A
rerun that reuses a cached training finds the model run holding the same weights (tag
`weights_digest`) and refers to it. Each new model is registered in MLflow's Model Registry under the
study's name, with its algorithm and seed as tags; `read_saved_model` loads one back from
`models:/<model id>`, `runs:/<model run id>` or `models:/<name>/<version>` (`adaptflow evaluate`).
There is no MLflow flavour (`mlflow.pytorch.log_model`): it pickles the module and takes 4-5 s a model
here, while these three files rebuild it with metalib.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from mlflow.artifacts import download_artifacts
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task

from adaptflow.errors import StudyError
from metalib import TrainingHistory
from tasks.caching import stable_token
from tasks.plots import learning_curve
from tasks.tracking import (
    MLFLOW_WRITES,
    TRANSIENT_RETRIES,
    StudyRun,
    ended_on_failure,
    log_file,
    log_flat,
    open_store,
    start_child_run,
    training_curves_binned,
)
from tasks.train import LearnerSetup, TrainedModel

WEIGHTS, SETUP, HISTORY = "weights.pt", "setup.json", "history.json"
MODEL_ID = "model_id"  # the model run's tag naming its logged model
CURVE = "learning_curve.png"  # in the model run
LOGGED_MODEL_NAME_FORBIDS = r"[/:.%\"']"  # characters MLflow refuses in a logged model's name


@dataclass(frozen=True)
class ModelRef:
    """A logged model and the model run that produced it."""

    run_id: str
    model_id: str

    @property
    def uri(self) -> str:
        """MLflow 3's URI of the logged model, which `adaptflow evaluate` accepts."""
        return f"models:/{self.model_id}"


def model_tags(setup: LearnerSetup, seed: int, target: str | None) -> dict[str, str]:
    tags = {"kind": "model", "algorithm": setup.label, "algorithm_name": setup.algorithm, "seed": str(seed)}
    return {**tags, "target_domain": target} if target else tags


def model_name(setup: LearnerSetup, seed: int, target: str | None) -> str:
    return "·".join([setup.label, *([target] if target else []), f"seed{seed}", "model"])


@task(name="log-model", tags=["cpu"], **MLFLOW_WRITES)
def log_model(
    study: StudyRun, setup: LearnerSetup, trained: TrainedModel, seed: int, target: str | None
) -> ModelRef:
    """The logged model with this model's weights: that of a finished model run of the experiment with
    the same learner and weights if there is one, else a new one (from a child of this study run)."""
    digest = hashlib.sha256(json.dumps(stable_token([setup, trained.state])).encode()).hexdigest()
    client = study.client
    found = client.search_runs(
        [study.experiment_id],
        f"tags.kind = 'model' and tags.weights_digest = '{digest}' and attributes.status = 'FINISHED' "
        f"and tags.{MODEL_ID} LIKE 'm-%'",  # a model run of an older adaptflow has no logged model
        max_results=1,
    )
    if found:
        return ModelRef(found[0].info.run_id, found[0].data.tags[MODEL_ID])
    tags = {
        **model_tags(setup, seed, target),
        "weights_digest": digest,
        "resumed_from_step": str(trained.resumed_from),
    }
    name = model_name(setup, seed, target)
    run_id = start_child_run(study, name, tags)
    with ended_on_failure(client, run_id):
        keep = ("algorithm", "algorithm_name", "seed", "target_domain")
        model = client.create_logged_model(
            study.experiment_id,
            name=re.sub(LOGGED_MODEL_NAME_FORBIDS, "-", name),  # `protonet [search:loso]` has a ':'
            source_run_id=run_id,
            tags={k: v for k, v in tags.items() if k in keep},
            params={k: str(v) for k, v in setup.resolved_hparams().items()},
            model_type="adaptflow",
        )
        with tempfile.TemporaryDirectory() as folder:
            torch.save(trained.state, Path(folder) / WEIGHTS)
            (Path(folder) / SETUP).write_text(json.dumps(asdict(setup), indent=1))
            (Path(folder) / HISTORY).write_text(
                json.dumps({**trained.history.to_dict(), "seconds": trained.seconds})
            )
            client.log_model_artifacts(model.model_id, folder)
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        log_training(client, run_id, trained, name)
        client.set_tag(run_id, MODEL_ID, model.model_id)
        register(study, ModelRef(run_id, model.model_id), model.artifact_location, model.tags)
    client.set_terminated(run_id, "FINISHED")
    return ModelRef(run_id, model.model_id)


def log_training(client: MlflowClient, run_id: str, trained: TrainedModel, name: str) -> None:
    """The training's curves (`train/loss` and `train/acc` `binned`, `val/acc` whole, by step), its
    summary metrics and `learning_curve.png` (every step), in the model run: once per model, not in
    each of its evaluation runs."""
    history = trained.history
    metrics = {
        "source_val_acc": history.best_val_acc,
        "best_step": history.best_step,
        "train_seconds": trained.seconds,
    }
    log_flat(client, run_id, metrics=metrics, curves=training_curves_binned(history.curves))
    with tempfile.TemporaryDirectory() as folder:
        log_file(
            client, run_id, learning_curve(history.curves, history.best_step, name, Path(folder) / CURVE)
        )


def register(study: StudyRun, model: ModelRef, location: str, tags: dict[str, str]) -> None:
    """A new version of the registered model named after the study (its experiment), for this model.

    The version's source is the logged model's folder, not `models:/<model id>`: MLflow's sqlite
    registry resolves that URI through the global tracking URI, not this client's. The logged model's
    `mlflow.modelVersions` tag links it to the version as `mlflow.register_model` does."""
    client = study.client
    name = client.get_experiment(study.experiment_id).name
    try:
        client.create_registered_model(name, description=f"models trained by study {name!r}")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, location, model.run_id, tags=tags, model_id=model.model_id)
    client.set_logged_model_tags(
        model.model_id, {"mlflow.modelVersions": json.dumps([{"name": name, "version": version.version}])}
    )


@task(name="log-failed-training", tags=["cpu"], **MLFLOW_WRITES)
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

    model: ModelRef
    setup: LearnerSetup
    seed: int
    target: str | None  # the target domain it was trained for (dann), else None


def read_saved_model(model_uri: str, tracking_uri: str) -> SavedModel:
    """The model at `models:/<model id>`, `runs:/<model run id>` or `models:/<registered name>/<version>`;
    its weights are read by `load_trained`, a task."""
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
    if MODEL_ID not in run.data.tags:
        raise StudyError(
            f"{model_uri}: model run {run_id} has no logged model (tag {MODEL_ID}); it was logged by an "
            "older adaptflow: run its study again to save the model whole"
        )
    model = ModelRef(run_id, run.data.tags[MODEL_ID])
    with tempfile.TemporaryDirectory() as folder:
        setup = json.loads(_download(client, tracking_uri, model.model_id, SETUP, folder).read_text())
    return SavedModel(
        model,
        LearnerSetup(**{**setup, "input_shape": tuple(setup["input_shape"])}),
        int(run.data.tags["seed"]),
        run.data.tags.get("target_domain"),
    )


@task(name="load-model", tags=["cpu"], **TRANSIENT_RETRIES)
def load_trained(tracking_uri: str, model: ModelRef) -> TrainedModel:
    """A logged model's weights and training curves, as its training left them."""
    client = open_store(tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        saved = json.loads(_download(client, tracking_uri, model.model_id, HISTORY, folder).read_text())
        weights = _download(client, tracking_uri, model.model_id, WEIGHTS, folder)
        state = torch.load(weights, weights_only=True)
    resumed = int(client.get_run(model.run_id).data.tags.get("resumed_from_step", 0))
    return TrainedModel(state, TrainingHistory.from_dict(saved), saved["seconds"], resumed)


def _download(client: MlflowClient, tracking_uri: str, model_id: str, name: str, folder: str) -> Path:
    """One artifact of a logged model. By its folder's URI: MLflow resolves `models:/<model id>` through
    the global tracking URI, not this store's."""
    location = client.get_logged_model(model_id).artifact_location
    uri = f"{location}/{name}"
    return Path(download_artifacts(artifact_uri=uri, dst_path=folder, tracking_uri=tracking_uri))


def _model_run_id(client: MlflowClient, model_uri: str) -> str:
    scheme, _, path = model_uri.partition(":/")
    parts = [part for part in path.split("/") if part]
    if scheme == "runs" and parts:
        return parts[0]
    try:
        if scheme == "models" and len(parts) == 1:
            return client.get_logged_model(parts[0]).source_run_id
        if scheme == "models" and len(parts) == 2:
            return client.get_model_version(parts[0], parts[1]).run_id
    except MlflowException as exc:
        raise StudyError(f"{model_uri}: no such logged model or registered version ({exc.message})") from None
    raise StudyError(
        f"{model_uri!r} is not a model URI: give models:/<model id> (an evaluation run's `model_uri` tag), "
        "runs:/<model run id> or models:/<study name>/<version> (MLflow's Model Registry)"
    )
