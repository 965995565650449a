"""`adaptflow run --workers N` and `--task-runner dask`: tasks run side by side, and every number is
the one a sequential run gives. Real Prefect (the session's server), real MLflow (sqlite), real
processes and a real Dask scheduler with two worker processes on loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from distributed import Client
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

from adaptflow.cli import main
from tests.conftest import DEMO, TINY_TRAINING, cli_overrides, stop

pytestmark = pytest.mark.slow

# 2 algorithms x 2 seeds = 4 trainings, x 2 targets = 8 evaluations: enough to keep two workers busy
TINY = cli_overrides(
    *TINY_TRAINING,
    "episodes.shots=[1]",
    "episodes.eval_episodes=20",
    "seeds=[0, 1]",
    "algorithms=[{name: protonet}, {name: finetune, adapt_steps: 10}]",
)
# (algorithm, seed, target, shots) -> (acc, acc_ci95, source_val_acc)
Numbers = dict[tuple[str, str, str, str], tuple[float, float, float]]
Span = tuple[datetime, datetime]


def run_study(tracking_uri: str, *flags: str) -> tuple[Numbers, list[Span]]:
    """Runs the tiny study with `flags`, every task recomputed (the cache is bypassed, so no run can
    copy another's numbers); returns its numbers and the spans of its train and evaluate task runs."""
    with temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True}):
        assert main(["run", str(DEMO), *TINY, "--tracking-uri", tracking_uri, *flags]) == 0
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("office-caltech-demo").experiment_id
    (parent,) = client.search_runs([experiment], "tags.kind = 'study'")
    numbers = {
        (tags["algorithm"], tags["seed"], tags["target_domain"], tags["shots"]): (
            metrics["acc"],
            metrics["acc_ci95"],
            metrics["source_val_acc"],
        )
        for run in client.search_runs([experiment], "tags.kind = 'evaluation'")
        for tags, metrics in [(run.data.tags, run.data.metrics)]
    }
    assert len(numbers) == 8
    flow_run = parent.data.tags["prefect_flow_run_id"]
    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run])))
    spans = [(t.start_time, t.end_time) for t in task_runs if t.name.startswith(("train", "evaluate"))]
    assert len(spans) == 12 and all(start and end for start, end in spans)
    return numbers, spans


def overlap(spans: list[Span]) -> bool:
    """Whether any two task runs ran at the same time."""
    ordered = sorted(spans)
    return any(later[0] < earlier[1] for earlier, later in zip(ordered, ordered[1:]))


@pytest.fixture(scope="module")
def sequential(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Numbers:
    """The tiny study run as before: one task at a time, in the test's process."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('sequential') / 'mlflow.db'}"
    numbers, spans = run_study(uri, "--workers", "1")
    assert not overlap(spans)
    return numbers


def test_two_worker_processes_reproduce_a_sequential_run(
    sequential: Numbers, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    numbers, spans = run_study(f"sqlite:///{tmp_path / 'mlflow.db'}", "--workers", "2")
    assert overlap(spans), "no two tasks ran at the same time with --workers 2"
    assert numbers == sequential
    # the workers' consoles are as quiet as the CLI's own: no task INFO line reached the terminal
    terminal = capfd.readouterr()
    assert "Finished in state" not in terminal.out + terminal.err
    assert "source validation accuracy" not in terminal.out + terminal.err


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[Client]:
    """A real Dask scheduler and two single-threaded worker processes on loopback, started with Dask's
    own commands as on a cluster; yields a client of it once both workers are connected."""
    dask = str(Path(sys.executable).parent / "dask")
    found = tmp_path / "scheduler.json"  # the scheduler writes its address here; the workers read it
    commands = {
        "scheduler": [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"],
        "workers": [dask, "worker", "--host", "127.0.0.1", "--nworkers", "2", "--nthreads", "1"],
    }
    processes = []
    try:
        for name, command in commands.items():
            with (tmp_path / f"dask-{name}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        [*command, "--scheduler-file", str(found)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        with Client(scheduler_file=str(found), timeout=120, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=120)
            yield client
    finally:
        for process in reversed(processes):  # the workers before the scheduler
            stop(process, grace=20)


def test_a_dask_cluster_reproduces_a_sequential_run(
    sequential: Numbers, dask_cluster: Client, tmp_path: Path
) -> None:
    address = dask_cluster.scheduler.address
    assert address.startswith("tcp://127.0.0.1:")
    numbers, spans = run_study(
        f"sqlite:///{tmp_path / 'mlflow.db'}", "--task-runner", "dask", "--address", address
    )
    executed = dask_cluster.run(lambda dask_worker: dask_worker.state.executed_count)
    assert len(executed) == 2 and all(count > 0 for count in executed.values()), executed
    assert overlap(spans), "no two tasks ran at the same time on two Dask workers"
    assert numbers == sequential
