"""MLflow logging: one experiment per study name, a parent run per study, a child run per evaluation.

Uses MlflowClient with explicit run ids, so it works from any thread or worker, and sends
metrics in batches (one call per 1,000 values, not one per value). Every param, tag and
spec.yaml goes through `adaptflow.redact`: no password, token or signature reaches MLflow.
A study checks its tracking server before it starts; the tasks that log retry transient errors
(TRANSIENT_RETRIES), and a retried task replaces, not duplicates, the run its failed attempt left.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml
from filelock import FileLock
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State, TaskRun
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run, task_run
from prefect.tasks import exponential_backoff

from adaptflow.errors import StudyError
from adaptflow.redact import has_secret, redact, redact_value
from adaptflow.settings import SECRET_PREFIX, default_tracking_uri
from adaptflow.spec import DataSpec, DomainSource, StudySpec, applicable_params
from tasks.stopping import interruption_behind, release_frames

MAX_PARAM_LENGTH = 6000  # MLflow's limits on a param's value and on any key
MAX_KEY_LENGTH = 250
# MLflow's UI draws a curve from 320 points of it per view (its charts ask for `maxResults: 320`)
CURVE_POINTS = 320
# The start-of-study check answers in seconds: MLflow's own client retries 7 times over minutes.
REACH_TIMEOUT_SECONDS = 5
REACH_RETRIES = 1
TASK_RUN_TAG = "prefect_task_run_id"  # the Prefect task run that logged a run: its retries find it


@dataclass(frozen=True)
class StudyRun:
    """The parent run of one study execution."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)


def tracking_store(tracking_uri: str | None) -> str:
    """The study's tracking URI, checked before anything is prepared or trained.

    A credential in the `tracking_uri` flow parameter is masked in the flow run Prefect stored (the
    value is still used to connect); a retry of that flow run from Prefect then lacks it, so the
    URI belongs in MLFLOW_TRACKING_URI on the worker instead (docs/reliability.md).
    """
    if tracking_uri and has_secret(tracking_uri) and flow_run.id:
        with get_client(sync_client=True) as client:
            stored = client.read_flow_run(flow_run.id).parameters
            client.update_flow_run(flow_run.id, parameters={**stored, "tracking_uri": redact(tracking_uri)})
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    return uri


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The URI to connect to: `tracking_uri`, else MLFLOW_TRACKING_URI, else the project's sqlite store.

    `prefect-secret:NAME` reads it from the Prefect Secret block NAME, so that a deployment's and a
    flow run's stored parameters hold a block name instead of a credential."""
    uri = tracking_uri or default_tracking_uri()
    if not uri.startswith(SECRET_PREFIX):
        return uri
    from prefect.blocks.system import Secret

    name = uri.removeprefix(SECRET_PREFIX)
    try:
        return str(Secret.load(name).get())
    except ValueError as exc:
        if not isinstance(exc.__cause__, ObjectNotFound):  # another fault with the block: Prefect's own
            raise
        raise StudyError(
            f"tracking URI {uri!r}: Prefect has no Secret block named {name!r}. Create it on the Prefect "
            f'server the study uses: python -c "from prefect.blocks.system import Secret; '
            f"Secret(value='http://user:password@host:5000').save('{name}')\""
        ) from exc


def check_reachable(tracking_uri: str) -> None:
    """Raises StudyError, naming the URI with credentials masked, unless an HTTP tracking server answers.

    Without it a study whose server is down would prepare its data, then hang in MLflow's retries.
    Any answer below 500 (an auth error too) means the server is up. Local stores need no check.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        response = http_request(
            get_default_host_creds(tracking_uri),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            max_retries=REACH_RETRIES,
            backoff_factor=1,
            timeout=REACH_TIMEOUT_SECONDS,
            raise_on_status=False,
            params={"max_results": 1},
        )
    except MlflowException as exc:
        reason = _connection_failure(exc)
    else:
        if response.status_code < 500:
            return
        reason = f"it answered HTTP {response.status_code} {response.reason}"
    raise StudyError(
        f"the MLflow tracking server {tracking_uri} cannot be reached ({reason}); nothing was run. "
        "Start it, or point --tracking-uri / MLFLOW_TRACKING_URI at a running server (unset, a local "
        "sqlite store is used), then run the study again."
    )


def _connection_failure(error: MlflowException) -> str:
    """The socket-level reason behind MLflow's 'API request ... failed with exception ...'."""
    cause = error.__cause__ or error.__context__ or error
    while cause.args and isinstance(getattr(cause.args[0], "reason", None), BaseException):
        cause = cause.args[0].reason  # requests' ConnectionError -> urllib3's MaxRetryError -> its reason
    return str(cause).split("): ", 1)[-1]  # without urllib3's "HTTPConnection(host=..., port=...): "


def is_transient(error: BaseException) -> bool:
    """A failure worth retrying: no connection, a timeout, HTTP 429 or 5xx, a locked sqlite database.

    Anything else (a bad parameter, a missing run, a full disk) fails the same way again.
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionError | TimeoutError | requests.ConnectionError | requests.Timeout):
            return True
        if isinstance(cause, requests.exceptions.RetryError):  # MLflow's client gave up on 429/5xx
            return True
        status = _http_status(cause)
        if status is not None and (status == 429 or status >= 500):
            return True
        if "database is locked" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _http_status(error: BaseException) -> int | None:
    """The HTTP status a tracking server (RestException) or artifact store (HTTPError) answered."""
    if isinstance(error, RestException):
        return error.get_http_status_code()
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return error.response.status_code
    return None


def retry_transient(task: Task[Any, Any], run: TaskRun, state: State[Any]) -> bool:
    """Prefect's retry_condition_fn: retry a logging task only when it failed on a transient error, and
    never when the failure hides an interruption: the study is stopping, and a retry only delays it
    (in CI, a SIGTERM inside a sqlite call left the store locked and the study slept through the
    retries, each failing "database is locked")."""
    error = state.data
    return isinstance(error, BaseException) and interruption_behind(error) is None and is_transient(error)


# Task options of every task that talks to MLflow: up to 4 retries, 2, 4, 8 and 16 s apart (+-50%),
# on top of the retries of MLflow's HTTP client (MLFLOW_HTTP_REQUEST_MAX_RETRIES).
TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": 4,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_transient,
}
# ... and of every task that writes runs to MLflow, which no cache may stand in for: each execution logs
# its own runs, and under Prefect's default policy each call hashed its inputs, a trained model's
# weights included (benchmarks/bookkeeping.py).
MLFLOW_WRITES: dict[str, Any] = {**TRANSIENT_RETRIES, "cache_policy": NO_CACHE}


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


@task(name="start-study-run", **MLFLOW_WRITES)
def start_study_run(
    spec: StudySpec, tracking_uri: str, tags: dict[str, str], datasets: list[DatasetInput], modality: str
) -> StudyRun:
    """The parent run with the spec (the params that apply to the data's `modality`, and spec.yaml
    whole) and the dataset inputs. A task, so that a transient error retries it like every other
    write to MLflow; a retry replaces the run its failed attempt left.

    The payloads are built (and, with `study_datasets`, checked by `adaptflow validate`) before the
    run is created, so a spec that cannot be logged leaves no run behind.
    """
    params, spec_yaml = applicable_params(spec, modality), spec.model_dump(mode="json")
    client = open_store(tracking_uri)
    experiment_id = ensure_experiment(client, spec.name, tracking_uri)
    name = f"study·{spec.name}·{time.strftime('%m-%d %H:%M:%S')}"
    study = StudyRun(
        tracking_uri, experiment_id, _create_run(client, experiment_id, name, {"kind": "study", **tags})
    )
    with ended_on_failure(client, study.run_id):  # a retry deletes it anyway
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
    """A new child run of the study's run (see `_create_run` for retries)."""
    return _create_run(study.client, study.experiment_id, name, {"mlflow.parentRunId": study.run_id, **tags})


@contextlib.contextmanager
def ended_on_failure(client: MlflowClient, run_id: str) -> Iterator[None]:
    """Ends run `run_id` FAILED if the block raises, KILLED if the block was interrupted (Ctrl-C,
    SIGTERM), then re-raises the block's error. An interruption inside one of the block's queries
    left that query's sqlite statement holding the store's lock from the traceback, and this write
    waited 20 s for it (`release_frames`). The store may also be what failed: then this write's own
    error is dropped (the block's error is the one a retry decides on) and the run stays RUNNING."""
    try:
        yield
    except BaseException as error:
        interrupted = interruption_behind(error) is not None
        if interrupted:
            release_frames(error)
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "KILLED" if interrupted else "FAILED")
        raise


def _create_run(client: MlflowClient, experiment_id: str, name: str, tags: dict[str, str]) -> str:
    """A new run. Inside a Prefect task, the runs an earlier attempt of the same task run left (a retry
    after a transient error) are deleted first, so a retry never logs a run twice; a first attempt
    has none to look for."""
    attempt = task_run.id
    if attempt:
        tags = {**tags, TASK_RUN_TAG: attempt}
        if task_run.run_count > 1:
            for run in client.search_runs([experiment_id], f"tags.{TASK_RUN_TAG} = '{attempt}'"):
                client.delete_run(run.info.run_id)
    return client.create_run(experiment_id, run_name=name, tags=_tags(tags)).info.run_id


def log_flat(
    client: MlflowClient,
    run_id: str,
    *,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    curves: dict[str, list[tuple[int, float]]] | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    """Params, single metrics, metric curves (step, value) and tags, in as few calls as MLflow allows:
    each `log_batch` takes at most 100 params, 100 tags and 1,000 entries in all."""
    now = int(time.time() * 1000)
    entries = [Metric(_key(key), float(value), now, 0) for key, value in (metrics or {}).items()]
    for key, points in (curves or {}).items():
        entries += [Metric(_key(key), float(value), now, step) for step, value in points]
    param_entries = [Param(_key(k), redact(str(v))[:MAX_PARAM_LENGTH]) for k, v in (params or {}).items()]
    tag_entries = [RunTag(k, v) for k, v in _tags(tags or {}).items()]
    while param_entries or tag_entries or entries:
        batch_params, param_entries = param_entries[:100], param_entries[100:]
        batch_tags, tag_entries = tag_entries[:100], tag_entries[100:]
        room = 1000 - len(batch_params) - len(batch_tags)
        batch_metrics, entries = entries[:room], entries[room:]
        client.log_batch(run_id, metrics=batch_metrics, params=batch_params, tags=batch_tags)


def binned(points: list[tuple[int, float]], limit: int = CURVE_POINTS) -> list[tuple[int, float]]:
    """A curve of `limit` points if it is longer: `limit` windows of consecutive points, as even as
    they divide, each logged as its mean at the step of its last point; a curve that fits is returned
    as it is. Logging a 3,000-step model's every step took MLflow's sqlite store 625 ms against 175
    ms binned (benchmarks/bookkeeping.py), in the flow's thread beside the next training, and the
    UI samples 320 points of a curve per view anyway (zoomed in, it no longer shows single steps)."""
    if len(points) <= limit:
        return points
    edges = [round(index * len(points) / limit) for index in range(limit + 1)]
    windows = [points[start:end] for start, end in zip(edges, edges[1:])]
    return [(window[-1][0], sum(value for _, value in window) / len(window)) for window in windows]


def training_curves_binned(curves: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """`curves` with each training curve (`train/loss`, `<fold>/train/acc`) `binned`, and the others
    (validation, held-out scores), on which a best step or a trial's score is chosen, whole."""
    return {
        name: binned(points) if name.split("/")[-2:-1] == ["train"] else points
        for name, points in curves.items()
    }


def _tags(tags: dict[str, Any]) -> dict[str, str]:
    """Tags as `create_run` takes them: keys MLflow accepts, values redacted."""
    return {_key(key): redact(str(value)) for key, value in tags.items()}


def _key(name: str) -> str:
    """A name MLflow accepts as a key on every platform (spec keys such as data.domains.<name>
    come from users): other characters become `_`, and it is cut at MLflow's 250 characters."""
    return re.sub(r"[^\w.\-/ ]", "_", name)[:MAX_KEY_LENGTH]


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
