"""Faults outside adaptflow: a tracking server that is down or answers 503, a GPU pool with no worker.

Everything is real: a closed loopback port, a real `mlflow server` behind a real HTTP proxy that
fails requests on purpose, and Prefect's temporary server with a real work pool and deployment.
"""

from __future__ import annotations

import http.client
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import FlowRun, TaskRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import TerminationSignal
from prefect.states import Failed, Pending, Running

from adaptflow.cli import main
from adaptflow.errors import StudyError
from adaptflow.spec import load_spec
from flows.study import study
from tasks.models import log_failed_training
from tasks.stopping import release_frames
from tasks.tracking import (
    TASK_RUN_TAG,
    StudyRun,
    ended_on_failure,
    ensure_experiment,
    is_transient,
    resolve_tracking_uri,
    retry_transient,
    start_study_run,
    tracking_store,
)
from tasks.train import LearnerSetup, train_on_pool
from tests.conftest import DEMO, TINY_TRAINING, cli_overrides, stop

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def closed_port() -> int:
    """A loopback port nothing listens on: bound, then released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def flow_runs(**filters: Any) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, **filters)


def flow_run_count() -> int:
    with get_client(sync_client=True) as client:
        return client.count_flow_runs()


def task_runs(flow_run: FlowRun) -> list[TaskRun]:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))


def test_an_unreachable_tracking_server_fails_the_study_before_anything_runs(
    prefect_server: None, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`adaptflow run` against a closed port: one message with the password masked, exit 2, and no
    flow run at all (the check comes before the data is loaded and before Prefect is asked)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the CLI puts a credentialed URI there
    uri = f"http://bob:hunter2@127.0.0.1:{closed_port()}"
    before = flow_run_count()
    started = time.perf_counter()
    code = main(["run", str(DEMO), "--tracking-uri", uri, *cli_overrides(*TINY_TRAINING, "seeds=[0]")])
    seconds = time.perf_counter() - started
    out, err = capfd.readouterr()
    assert code == 2
    masked = uri.replace("hunter2", "***")
    assert (
        f"adaptflow: error: the MLflow tracking server {masked} cannot be reached (Failed to establish a new "
        "connection: [Errno 111] Connection refused); nothing was run. Start it, or point --tracking-uri / "
        "MLFLOW_TRACKING_URI at a running server"
    ) in err
    assert "hunter2" not in out + err
    assert seconds < 30, f"the check took {seconds:.0f} s: MLflow's own retries were not bypassed"
    assert flow_run_count() == before


def test_a_credential_in_the_tracking_uri_parameter_is_masked_in_prefect(prefect_server: None) -> None:
    """Prefect stores flow parameters: the study masks the URI's password in its own flow run."""
    uri = f"https://alice:s3cret@127.0.0.1:{closed_port()}/mlflow"
    with pytest.raises(StudyError, match=r"https://alice:\*\*\*@127\.0\.0\.1:\d+/mlflow cannot be reached"):
        study(spec=str(DEMO), overrides=TINY_TRAINING, tracking_uri=uri)
    latest = flow_runs()[0]
    assert latest.parameters["tracking_uri"] == uri.replace("s3cret", "***")
    assert latest.parameters["overrides"] == TINY_TRAINING
    assert task_runs(latest) == []


def test_a_tracking_uri_in_a_prefect_secret_block_stays_out_of_the_flow_run(
    prefect_server: None, mlflow_server: int
) -> None:
    """`prefect-secret:NAME`: the store the flow connects to (`tracking_store`, a study's first step,
    which reaches the server) is the URI with a password that the block holds, and the password is
    nowhere in the flow run Prefect stored."""
    from prefect.blocks.system import Secret

    store = f"http://alice:s3cret@127.0.0.1:{mlflow_server}"
    Secret(value=store).save("test-mlflow-uri", overwrite=True)

    @flow
    def connect(tracking_uri: str) -> str:
        return tracking_store(tracking_uri)

    assert connect("prefect-secret:test-mlflow-uri") == store
    latest = flow_runs()[0]
    assert latest.parameters["tracking_uri"] == "prefect-secret:test-mlflow-uri"
    assert "s3cret" not in latest.model_dump_json()
    with pytest.raises(StudyError, match="Prefect has no Secret block named 'missing'. Create it"):
        resolve_tracking_uri("prefect-secret:missing")


class FlakyProxy(ThreadingHTTPServer):
    """Forwards every request to `upstream`, but answers 503 to the first `failures` requests whose
    path contains `fail_path`: a tracking server behind a load balancer that is restarting."""

    def __init__(self, upstream: int, fail_path: str, failures: int) -> None:
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream, self.fail_path, self.failures_left = upstream, fail_path, failures
        self.answered_503 = 0


class ProxyHandler(BaseHTTPRequestHandler):
    server: FlakyProxy

    def forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.fail_path in self.path and self.server.failures_left > 0:
            self.server.failures_left -= 1
            self.server.answered_503 += 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        upstream.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real `mlflow server` (sqlite store, served artifacts) on a free loopback port."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = closed_port()
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    stores = ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", "art"]
    process = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *stores],
        env={**os.environ, **env},
        cwd=folder,
        stdout=(folder / "server.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()
            time.sleep(0.25)
    try:
        yield port
    finally:
        stop(process, grace=10)


@pytest.fixture
def flaky(mlflow_server: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyProxy]:
    """The proxy, failing the first `runs/update` (ending a run); MLflow's own HTTP retries off, so
    each 503 reaches the caller at once instead of being retried for minutes inside MLflow."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with serving(FlakyProxy(mlflow_server, "/runs/update", failures=1)) as proxy:
        yield proxy


@contextmanager
def serving(proxy: FlakyProxy) -> Iterator[FlakyProxy]:
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_transient_errors_are_told_from_bad_input_on_real_failures(flaky: FlakyProxy, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{flaky.server_address[1]}"
    refused = MlflowClient(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(MlflowException) as no_connection:
        refused.search_experiments()
    client = MlflowClient(uri)
    with pytest.raises(MlflowException) as missing:
        client.get_run("0" * 32)
    run = client.create_run(ensure_experiment(client, "faults", uri))
    with pytest.raises(MlflowException) as unavailable:
        client.set_terminated(run.info.run_id)  # the proxy's 503
    with pytest.raises(MlflowException) as bad_value:
        client.log_param(run.info.run_id, "", "no key")
    database = tmp_path / "locked.db"
    holder = sqlite3.connect(database)
    holder.execute("create table t (x)")
    holder.execute("begin exclusive")
    with pytest.raises(sqlite3.OperationalError) as locked:
        sqlite3.connect(database, timeout=0).execute("select * from t")
    holder.close()
    assert (
        is_transient(no_connection.value) and is_transient(unavailable.value) and is_transient(locked.value)
    )
    assert not is_transient(missing.value) and not is_transient(bad_value.value)


def test_a_logging_task_retries_a_503_and_leaves_one_run(prefect_server: None, flaky: FlakyProxy) -> None:
    """log-failed-training's run is created, then ending it gets a 503: Prefect retries the task after
    a backoff, the retry deletes the unfinished run of the first attempt, and MLflow shows one run."""
    uri = f"http://127.0.0.1:{flaky.server_address[1]}"
    client = MlflowClient(uri)
    experiment = ensure_experiment(client, "retried", uri)
    parent = client.create_run(experiment).info.run_id
    setup = LearnerSetup("protonet", "protonet", {}, "mlp", {}, (8,), 5, 5, 10)

    @flow
    def log_a_failure() -> str:
        return log_failed_training(StudyRun(uri, experiment, parent), setup, 0, None, "out of memory")

    run_id = log_a_failure()
    assert flaky.answered_503 == 1
    (run,) = client.search_runs([experiment], "tags.kind = 'model'")
    assert run.info.run_id == run_id and run.info.status == "FAILED"
    assert run.data.tags["error"] == "out of memory"
    (first_attempt,) = client.search_runs(
        [experiment], "tags.kind = 'model'", run_view_type=ViewType.DELETED_ONLY
    )
    assert first_attempt.data.tags[TASK_RUN_TAG] == run.data.tags[TASK_RUN_TAG]
    (task_run,) = task_runs(flow_runs()[0])
    assert task_run.run_count == 2 and task_run.state.is_completed()


def test_the_study_run_start_retries_a_503_and_leaves_one_run(
    prefect_server: None, mlflow_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent run is created, then logging its params gets a 503: start-study-run retries after a
    backoff, the retry deletes the first attempt's run, and MLflow shows one study run, complete."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    spec = load_spec(DEMO, ["name=retried-start"])

    @flow
    def start(uri: str) -> StudyRun:
        return start_study_run(spec, uri, {"origin": "test"}, [], "features")

    with serving(FlakyProxy(mlflow_server, "/runs/log-batch", failures=1)) as proxy:
        run = start(f"http://127.0.0.1:{proxy.server_address[1]}")
        assert proxy.answered_503 == 1
    client = MlflowClient(f"http://127.0.0.1:{mlflow_server}")
    experiment = client.get_experiment_by_name("retried-start").experiment_id
    (kept,) = client.search_runs([experiment], "tags.kind = 'study'")
    assert kept.info.run_id == run.run_id
    assert kept.data.params["episodes.ways"] == str(spec.episodes.ways) and kept.data.tags["origin"] == "test"
    (first_attempt,) = client.search_runs(
        [experiment], "tags.kind = 'study'", run_view_type=ViewType.DELETED_ONLY
    )
    assert first_attempt.data.tags[TASK_RUN_TAG] == kept.data.tags[TASK_RUN_TAG]
    (task_run,) = task_runs(flow_runs()[0])
    assert task_run.name.startswith("start-study-run") and task_run.run_count == 2


@pytest.fixture
def idle_pool(prefect_server: None) -> str:
    """A process work pool with no worker and a deployment of the `train` flow on it."""
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="idle-gpu", type="process"), overwrite=True)
        flow_id = client.create_flow_from_name("train")
        client.create_deployment(
            flow_id=flow_id, name="idle", work_pool_name="idle-gpu", entrypoint="flows/train.py:train"
        )
    return "train/idle"


def remote_runs() -> list[FlowRun]:
    return flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["idle"])))


def test_a_training_no_worker_picks_up_is_cancelled_with_a_message(
    idle_pool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTFLOW_POOL_PICKUP_TIMEOUT", "3")
    spec = load_spec(DEMO, TINY_TRAINING).model_dump(mode="json")

    @flow
    def send_to_pool() -> None:
        train_on_pool(idle_pool, spec, 0, 0)

    started = time.perf_counter()
    with pytest.raises(RuntimeError) as raised:
        send_to_pool()
    assert time.perf_counter() - started < 20
    remote = remote_runs()[0]
    assert str(raised.value) == (
        f"no worker picked up training run {remote.name} of train/idle from work pool 'idle-gpu' within 3 s "
        "(ADAPTFLOW_POOL_PICKUP_TIMEOUT), so it was cancelled. Start a worker on a host with a GPU: "
        "`prefect worker start --pool idle-gpu`, then run the study again."
    )
    assert remote.state is not None and remote.state.is_cancelled()


def test_a_spec_holding_a_credential_is_not_sent_to_the_gpu_pool(idle_pool: str) -> None:
    """Prefect stores a deployment run's parameters in plain text: the spec is refused, and no flow
    run (which would hold the password) is created."""
    spec = load_spec(DEMO, TINY_TRAINING).model_dump(mode="json")
    spec["data"]["path"] = "https://bob:hunter2@example.com/office"
    before = len(remote_runs())
    with pytest.raises(StudyError, match="the spec holds a credential .* plain text"):
        train_on_pool.fn(idle_pool, spec, 0, 0)
    assert len(remote_runs()) == before


def test_a_training_a_worker_took_is_not_cut_off_by_the_pickup_timeout(
    idle_pool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Playing the worker through the API: the run goes Pending, then Running past the hand-off timeout,
    then fails; the study waits for that end and reports it, not a hand-off timeout."""
    monkeypatch.setenv("ADAPTFLOW_POOL_PICKUP_TIMEOUT", "2")
    spec = load_spec(DEMO, TINY_TRAINING).model_dump(mode="json")
    known = {run.id for run in remote_runs()}

    def worker() -> None:
        while not (new := [run for run in remote_runs() if run.id not in known]):
            time.sleep(0.2)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(new[0].id, Pending())
            client.set_flow_run_state(new[0].id, Running())
            time.sleep(5)  # training, well past the 2 s hand-off timeout
            client.set_flow_run_state(new[0].id, Failed(message="CUDA out of memory"))

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    with pytest.raises(RuntimeError, match=r"training run .* of train/idle ended Failed"):
        train_on_pool.fn(idle_pool, spec, 0, 0)
    thread.join(10)


def test_a_logging_task_hiding_an_interruption_is_not_retried(tmp_path: Path) -> None:
    """SIGTERM (Prefect's TerminationSignal) landing inside a sqlite call leaves that connection holding
    the store's lock, and the task fails "database is locked" while handling it: a transient error,
    but retrying it only waits out the retries with the lock still held (seen in CI: the study did not
    stop). A locked store alone is still retried."""
    database = tmp_path / "locked.db"
    holder = sqlite3.connect(database)
    holder.execute("create table t (x)")
    holder.execute("begin exclusive")

    def locked() -> None:
        sqlite3.connect(database, timeout=0).execute("select * from t")

    with pytest.raises(sqlite3.OperationalError) as alone:
        locked()
    with pytest.raises(sqlite3.OperationalError) as behind_a_signal:
        try:
            raise TerminationSignal(signal=15)
        except TerminationSignal:
            locked()
    holder.close()
    task, run = log_failed_training, None
    assert retry_transient(task, run, Failed(data=alone.value))  # type: ignore[arg-type]
    assert not retry_transient(task, run, Failed(data=behind_a_signal.value))  # type: ignore[arg-type]


def _store_locked(database: Path) -> bool:
    """Whether another connection holds a lock on the sqlite file (no waiting)."""
    probe = sqlite3.connect(database, timeout=0, isolation_level=None)
    try:
        probe.execute("begin exclusive")
        probe.execute("rollback")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        probe.close()


def test_an_interruption_inside_an_eager_mlflow_read_leaves_the_store_unlocked(tmp_path: Path) -> None:
    """Where a clean-clone suite's SIGTERM landed (its log kept): inside MLflow's `create_run`, while
    SQLAlchemy set up the eager load of the experiment's tags, its first query's cursor open. That
    cursor is held by a closure of a frame the interruption passed through, and the traceback's head
    by the `with` statement handling it (as in flows/study.py:ended_if_stopped): clearing the frames'
    locals left the store locked, and the study's KILLED write failed 6 times over 139 s.
    `release_frames` must free it. The signal is raised at that call through a trace function."""
    database = tmp_path / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    experiment_id = client.create_experiment("interrupted")
    locked: list[bool] = []

    @contextmanager
    def handled() -> Iterator[None]:
        try:
            yield
        except TerminationSignal as error:
            locked.append(_store_locked(database))  # the read's lock, as in CI
            release_frames(error)
            locked.append(_store_locked(database))
            raise

    def signal_there(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_name == "_generate_from_original_query":
            sys.settrace(None)
            raise TerminationSignal(signal=15)

    sys.settrace(signal_there)
    try:
        with pytest.raises(TerminationSignal), handled():
            client.create_run(experiment_id)
    finally:
        sys.settrace(None)
    assert locked == [True, False], "no such call (SQLAlchemy changed?)" if not locked else locked


def _interrupted_inside_a_query(database: Path) -> None:
    """SIGTERM (Prefect's TerminationSignal) landing just after a query's first row: the statement,
    referenced from this frame, holds the store's read lock, which a rollback does not release."""
    reading = sqlite3.connect(database).execute("select run_uuid from runs, (select 1 union all select 2)")
    assert reading.fetchone() is not None  # and a second row to come
    raise TerminationSignal(signal=15)


@pytest.mark.parametrize("how", ["interrupted", "hidden interruption", "failed"])
def test_a_failed_or_interrupted_logging_block_ends_its_run(how: str, tmp_path: Path) -> None:
    """A logging block that fails ends its run FAILED; one that is interrupted, KILLED, also when the
    interruption landed inside one of its queries, and when a clean-up's error replaced it. Before,
    that query's lock made the write wait out sqlite's 20 s busy timeout and fail "database is
    locked" (seen in CI), and the run stayed RUNNING. The block's own error is what propagates."""
    database = tmp_path / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    run_id = client.create_run(client.create_experiment("logging")).info.run_id
    raised = {"interrupted": TerminationSignal, "hidden interruption": ConnectionError, "failed": ValueError}
    with pytest.raises(raised[how]):
        with ended_on_failure(client, run_id):
            if how == "failed":
                raise ValueError("a bad parameter")
            try:
                _interrupted_inside_a_query(database)
            except TerminationSignal:
                if how == "hidden interruption":  # a half-finished HTTP client failing on the way out
                    raise ConnectionError("connection reset") from None
                raise
    assert client.get_run(run_id).info.status == ("FAILED" if how == "failed" else "KILLED")
