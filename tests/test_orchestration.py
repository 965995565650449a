"""Real orchestration: a Prefect server on 127.0.0.1, work pools and deployments from prefect.yaml,
a process worker, and study and sweep deployment runs, checked through the Prefect API and MLflow."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, TINY_TRAINING, stop

pytestmark = pytest.mark.slow

PREFECT = str(Path(sys.executable).parent / "prefect")
TINY = [
    *TINY_TRAINING,
    "episodes.eval_episodes=10",
    "seeds=[0]",
    "algorithms=[{name: protonet}]",
]


@dataclass(frozen=True)
class Server:
    """A running Prefect server and the environment that points a client or worker at it."""

    api_url: str
    env: dict[str, str]
    logs: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


def start(command: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    """In its own process group, so that stopping it also stops what it started."""
    return subprocess.Popen(
        command, env=env, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def prefect(server: Server, *args: str) -> str:
    done = subprocess.run(
        [PREFECT, *args], env=server.env, cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`prefect server start` on a free local port, with its own PREFECT_HOME and no analytics."""
    folder = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(folder / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    env.pop("PREFECT_API_URL", None)
    logs = folder / "server.log"
    process = start(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, logs, folder
    )
    api_url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while True:
        try:
            if get(f"{api_url}/health")[0] == 200:
                break
        except OSError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, logs.read_text()[-3000:]
        time.sleep(0.5)
    try:
        yield Server(api_url, {**env, "PREFECT_API_URL": api_url, "ADAPTFLOW_HOME": str(ROOT)}, logs)
    finally:
        stop(process, grace=20)


@pytest.fixture(scope="module")
def deployed(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Both pools from deploy/work-pools, every deployment of prefect.yaml, and a worker per pool
    started outside the project: the deployments' pull step must move runs into ADAPTFLOW_HOME."""
    for pool in ("cpu", "gpu"):
        prefect(server, "work-pool", "create", pool, "--type", "process", "--base-job-template",
                f"deploy/work-pools/{pool}.json")  # fmt: skip
    prefect(server, "--no-prompt", "deploy", "--all")
    elsewhere = tmp_path_factory.mktemp("workers")
    env = {**server.env, "PREFECT_WORKER_QUERY_SECONDS": "1"}  # picks up runs at once
    workers = [
        start([PREFECT, "worker", "start", "--pool", pool, *limit], env, elsewhere / f"{pool}.log", elsewhere)
        for pool, limit in (("cpu", []), ("gpu", ["--limit", "1"]))  # one worker per GPU, one run each
    ]
    try:
        yield server
    finally:
        for worker in workers:  # before the server: a worker can hang while the server shuts down
            stop(worker, grace=15)


def run(server: Server, deployment: str, parameters: dict[str, Any]) -> Any:
    """Triggers a deployment run and waits for it to finish (or 5 minutes)."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        return run_deployment(deployment, parameters=parameters, timeout=300, poll_interval=1)


def api(server: Server, call: str, **filters: Any) -> list[Any]:
    """Reads task runs or artifacts of the server (`call` names the client method)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        return getattr(client, call)(**filters)


def flow_run_filter(flow_run_id: Any) -> Any:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))


def test_server_serves_the_api_and_the_ui(server: Server) -> None:
    assert get(f"{server.api_url}/health") == (200, "true")
    status, page = get(server.api_url.removesuffix("/api") + "/")
    assert status == 200 and "<html" in page.lower()


def test_deployments_from_prefect_yaml(deployed: Server) -> None:
    deployments = {d.name: d for d in api(deployed, "read_deployments")}
    assert set(deployments) == {"study", "sweep", "nightly-benchmark", "gpu"}
    assert [s.active for s in deployments["nightly-benchmark"].schedules] == [False]
    assert deployments["sweep"].global_concurrency_limit.limit == 1
    assert deployments["gpu"].work_pool_name == "gpu" and deployments["study"].work_pool_name == "cpu"
    gpu_pool = api(deployed, "read_work_pool", work_pool_name="gpu")
    assert gpu_pool.base_job_template["variables"]["properties"]["env"]["default"] == {
        "CUDA_VISIBLE_DEVICES": "0"
    }


def test_study_deployment_runs_on_the_worker(deployed: Server, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    flow_run = run(
        deployed,
        "study/study",
        {"spec": "studies/demo.yaml", "overrides": [*TINY, "episodes.shots=[1]"], "tracking_uri": uri},
    )
    assert flow_run.state.is_completed(), flow_run.state
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("office-caltech-demo")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "study"]
    children = [r for r in runs if r.data.tags.get("kind") == "evaluation"]
    assert sorted(r.data.tags["target_domain"] for r in children) == ["dslr", "webcam"]
    assert {r.data.tags["prefect_flow_run_id"] for r in children} == {str(flow_run.id)}
    assert all(r.info.status == "FINISHED" for r in [parent, *children])

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    artifacts = api(
        deployed,
        "read_artifacts",
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])),
    )
    by_key = {a.key: a for a in artifacts if a.key}
    assert {"study-results", "mlflow-office-caltech-demo-webcam-dslr"} <= set(by_key)
    assert parent.info.run_id in by_key["mlflow-office-caltech-demo-webcam-dslr"].data
    progress = {a.task_run_id is None: a for a in artifacts if a.type == "progress"}
    assert progress[False].data == 100.0  # the training's, on its task run
    study = progress[True]  # the whole study's, on the flow run: 1 training, 2 targets x 1 shot
    assert study.data == 100.0 and study.description.endswith("1/1 trainings, 2/2 evaluations")


def test_sweep_fans_out_and_resumes_from_its_cache(deployed: Server, tmp_path: Path) -> None:
    parameters = {
        "spec": "studies/demo.yaml",
        "overrides": [*TINY, "episodes.shots=[1]"],
        "pairs": [{"source": ["amazon"], "target": ["dslr"]}],
        "leave_one_out": ["caltech", "webcam"],  # caltech -> webcam and webcam -> caltech
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    first = run(deployed, "sweep/sweep", parameters)
    assert first.state.is_completed(), first.state
    task_runs = api(deployed, "read_task_runs", flow_run_filter=flow_run_filter(first.id))
    spans = sorted((t.start_time, t.end_time) for t in task_runs if t.start_time and t.end_time)
    overlapping = [a for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
    assert overlapping, "no two task runs of the sweep ran at the same time"
    trains = [t for t in task_runs if t.name.rsplit("-", 1)[0] == "train"]
    assert len(trains) == 3 and all(t.state.name == "Completed" for t in trains)

    second = run(deployed, "sweep/sweep", parameters)
    assert second.state.is_completed(), second.state
    again = api(deployed, "read_task_runs", flow_run_filter=flow_run_filter(second.id))
    assert sorted(t.state.name for t in again if t.name.rsplit("-", 1)[0] == "train") == ["Cached"] * 3

    client = MlflowClient(tracking_uri=parameters["tracking_uri"])
    experiment = client.get_experiment_by_name("office-caltech-demo")
    parents = [
        r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("kind") == "study"
    ]
    assert len(parents) == 6  # one per domain pair and sweep run
    assert sorted({r.data.tags["prefect_flow_run_id"] for r in parents}) == sorted(
        [str(first.id), str(second.id)]
    )


def test_training_goes_to_the_gpu_pool_and_comes_back(deployed: Server) -> None:
    """What a `study` deployment run of a `train.device: cuda` spec does for each model, on CPU:
    the `train-on-pool` task runs `train/gpu` on the gpu worker and reads the trained model back
    from the result storage the two sides share."""
    from prefect import flow
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from adaptflow.spec import load_spec
    from flows.study import GPU_TRAINING
    from tasks.train import TrainedModel, train_on_pool

    spec = load_spec("studies/demo.yaml", [*TINY, "train.device=cpu"]).model_dump(mode="json")

    @flow
    def train_on_the_gpu_pool() -> TrainedModel:
        return train_on_pool(GPU_TRAINING, spec, 0, 0)

    shared = Path(deployed.env["PREFECT_HOME"]) / "storage"  # the workers' result storage
    updates = {PREFECT_API_URL: deployed.api_url, PREFECT_RESULTS_LOCAL_STORAGE_PATH: shared}
    with temporary_settings(updates=updates):
        trained = train_on_the_gpu_pool()
    assert trained.state and trained.history.best_step in (0, 5, 10) and trained.history.best_val_acc > 0.2
    (remote,) = api(
        deployed,
        "read_flow_runs",
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["gpu"])),
    )
    assert remote.state.is_completed() and remote.work_pool_name == "gpu"
