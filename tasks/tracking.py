"""MLflow logging: one experiment per study name, a parent run per study, a child run per evaluation.

Uses MlflowClient with explicit run ids, so it works from any thread or worker, and sends
metrics in batches (one call per 1,000 values, not one per value).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from adaptflow.spec import StudySpec, flatten


@dataclass(frozen=True)
class StudyRun:
    """The parent run of one study execution."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it (opening on the runs table) if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(
        name,
        artifact_location=_local_artifact_root(tracking_uri),
        tags={"mlflow.experimentKind": "custom_model_development"},
    )


def start_study_run(spec: StudySpec, tracking_uri: str, tags: dict[str, str]) -> StudyRun:
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = ensure_experiment(client, spec.name, tracking_uri)
    run = client.create_run(experiment_id, run_name=f"study·{spec.name}", tags={"kind": "study", **tags})
    study = StudyRun(tracking_uri, experiment_id, run.info.run_id)
    log_flat(study.client, study.run_id, params=flatten(spec))
    log_yaml(study.client, study.run_id, spec.model_dump(mode="json"), "spec.yaml")
    return study


def log_dataset(study: StudyRun, spec: StudySpec, fingerprint: str, rows: int) -> None:
    """Records the data as an MLflow dataset input: where it came from and its fingerprint."""
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    source = HuggingFaceDatasetSource(
        path=spec.data.path, data_files=spec.data.data_files, revision=spec.data.revision
    )
    dataset = MetaDataset(source, name=Path(spec.data.path).name, digest=fingerprint)
    entity = dataset._to_mlflow_entity()
    tags = [mlflow.entities.InputTag("rows", str(rows))]
    study.client.log_inputs(study.run_id, datasets=[mlflow.entities.DatasetInput(entity, tags)])


def start_child_run(study: StudyRun, name: str, tags: dict[str, str]) -> str:
    run = study.client.create_run(
        study.experiment_id, run_name=name, tags={"mlflow.parentRunId": study.run_id, **tags}
    )
    return run.info.run_id


def log_flat(
    client: MlflowClient,
    run_id: str,
    *,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    curves: dict[str, list[tuple[int, float]]] | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    """Params, single metrics, metric curves (step, value) and tags, in as few calls as MLflow allows."""
    now = int(time.time() * 1000)
    entries = [Metric(key, float(value), now, 0) for key, value in (metrics or {}).items()]
    for key, points in (curves or {}).items():
        entries += [Metric(key, float(value), now, step) for step, value in points]
    for chunk in _chunks([Param(k, str(v)[:6000]) for k, v in (params or {}).items()], 100):
        client.log_batch(run_id, params=chunk)
    for chunk in _chunks([RunTag(k, str(v)) for k, v in (tags or {}).items()], 100):
        client.log_batch(run_id, tags=chunk)
    for chunk in _chunks(entries, 1000):
        client.log_batch(run_id, metrics=chunk)


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    """MLflow's log_batch takes at most 100 params, 100 tags and 1,000 metrics per call."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def log_yaml(client: MlflowClient, run_id: str, value: Any, name: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_text(yaml.safe_dump(value, sort_keys=False))
        client.log_artifact(run_id, str(path))


def log_file(client: MlflowClient, run_id: str, path: Path) -> None:
    client.log_artifact(run_id, str(path))


def _local_artifact_root(tracking_uri: str) -> str | None:
    """For a local sqlite store, artifacts go to mlruns/ next to the database file."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        return (Path(tracking_uri[len(prefix) :]).parent / "mlruns").resolve().as_uri()
    return None
