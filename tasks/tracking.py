"""MLflow logging: one experiment per study name, a parent run per study, a child run per evaluation.

Uses MlflowClient with explicit run ids, so it works from any thread or worker, and sends
metrics in batches (one call per 1,000 values, not one per value). Every param, tag and
spec.yaml goes through `adaptflow.redact`: no password, token or signature reaches MLflow.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from adaptflow.redact import redact, redact_value
from adaptflow.spec import DataSpec, DomainSource, StudySpec, flatten

MAX_PARAM_LENGTH = 6000  # MLflow's limits on a param's value and on any key
MAX_KEY_LENGTH = 250


@dataclass(frozen=True)
class StudyRun:
    """The parent run of one study execution."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)


def open_store(tracking_uri: str) -> MlflowClient:
    """A client of the tracking store, which exists when this returns.

    MLflow creates (migrates) a new sqlite database on first use, and two processes doing that at
    once both fail ("table ... already exists"): two studies started together on a fresh
    machine. A file lock next to the database lets one create it while the others wait.
    """
    database = _sqlite_file(tracking_uri)
    if database is None:
        return MlflowClient(tracking_uri=tracking_uri)
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock"):
        client = MlflowClient(tracking_uri=tracking_uri)  # may already create the store
        client.search_experiments(max_results=1)
    return client


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it (opening on the runs table) if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name,
            artifact_location=_local_artifact_root(tracking_uri),
            tags={"mlflow.experimentKind": "custom_model_development"},
        )
    except MlflowException as exc:  # another study created it since the lookup above
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def start_study_run(
    spec: StudySpec, tracking_uri: str, tags: dict[str, str], datasets: list[DatasetInput]
) -> StudyRun:
    """The parent run with the spec (params and spec.yaml) and the dataset inputs.

    The payloads are built (and, with `study_datasets`, checked by `adaptflow validate`) before the
    run is created, so a spec that cannot be logged leaves no run behind.
    """
    params, spec_yaml = flatten(spec), spec.model_dump(mode="json")
    client = open_store(tracking_uri)
    experiment_id = ensure_experiment(client, spec.name, tracking_uri)
    run = client.create_run(
        experiment_id, run_name=f"study·{spec.name}", tags=_tags({"kind": "study", **tags})
    )
    study = StudyRun(tracking_uri, experiment_id, run.info.run_id)
    log_flat(study.client, study.run_id, params=params)
    log_yaml(study.client, study.run_id, spec_yaml, "spec.yaml")
    study.client.log_inputs(study.run_id, datasets=datasets)
    return study


def study_datasets(spec: StudySpec, fingerprint: str, rows_per_domain: dict[str, int]) -> list[DatasetInput]:
    """MLflow dataset inputs: where the data came from (secrets masked) and the prepared fingerprint.

    One input for a dataset with a domain column; one per domain, tagged source or target, when
    `data.domains` gives each domain its own dataset, config or split.
    """
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    def entry(name: str, source: DomainSource | DataSpec, rows: int, context: str) -> DatasetInput:
        assert source.path is not None  # the spec requires a path for the data or for every domain
        origin = HuggingFaceDatasetSource(
            path=redact(source.path),
            config_name=source.config,
            data_files=redact_value(source.data_files),
            split=getattr(source, "split", None),
            revision=source.revision,
        )
        entity = MetaDataset(origin, name=name, digest=fingerprint)._to_mlflow_entity()
        tags = [InputTag("rows", str(rows)), InputTag("mlflow.data.context", context)]
        return DatasetInput(entity, tags)

    if spec.data.domains is None:
        name = Path(redact(spec.data.path or "data")).name or "data"
        return [entry(name, spec.data, sum(rows_per_domain.values()), "source+target")]
    sources = spec.data.domain_sources()
    return [
        entry(
            domain, sources[domain], rows_per_domain[domain], "source" if domain in spec.source else "target"
        )
        for domain in [*spec.source, *spec.target]
    ]


def start_child_run(study: StudyRun, name: str, tags: dict[str, str]) -> str:
    run = study.client.create_run(
        study.experiment_id, run_name=name, tags=_tags({"mlflow.parentRunId": study.run_id, **tags})
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
    entries = [Metric(_key(key), float(value), now, 0) for key, value in (metrics or {}).items()]
    for key, points in (curves or {}).items():
        entries += [Metric(_key(key), float(value), now, step) for step, value in points]
    param_entries = [Param(_key(k), redact(str(v))[:MAX_PARAM_LENGTH]) for k, v in (params or {}).items()]
    for chunk in _chunks(param_entries, 100):
        client.log_batch(run_id, params=chunk)
    for chunk in _chunks([RunTag(k, v) for k, v in _tags(tags or {}).items()], 100):
        client.log_batch(run_id, tags=chunk)
    for chunk in _chunks(entries, 1000):
        client.log_batch(run_id, metrics=chunk)


def _tags(tags: dict[str, Any]) -> dict[str, str]:
    """Tags as `create_run` takes them: keys MLflow accepts, values redacted."""
    return {_key(key): redact(str(value)) for key, value in tags.items()}


def _key(name: str) -> str:
    """A name MLflow accepts as a key on every platform (spec keys such as data.domains.<name>
    come from users): other characters become `_`, and it is cut at MLflow's 250 characters."""
    return re.sub(r"[^\w.\-/ ]", "_", name)[:MAX_KEY_LENGTH]


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    """MLflow's log_batch takes at most 100 params, 100 tags and 1,000 metrics per call."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def log_yaml(client: MlflowClient, run_id: str, value: Any, name: str) -> None:
    """`value` as a YAML artifact, every URI in it redacted."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_text(yaml.safe_dump(redact_value(value), sort_keys=False))
        client.log_artifact(run_id, str(path))


def log_file(client: MlflowClient, run_id: str, path: Path) -> None:
    client.log_artifact(run_id, str(path))


def _local_artifact_root(tracking_uri: str) -> str | None:
    """For a local sqlite store, artifacts go to mlruns/ next to the database file."""
    database = _sqlite_file(tracking_uri)
    return (database.parent / "mlruns").resolve().as_uri() if database else None


def _sqlite_file(tracking_uri: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix) :]) if tracking_uri.startswith(prefix) else None
