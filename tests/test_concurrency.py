"""Two `adaptflow run` of one spec started together, on one MLflow store, one Prefect server and one
result storage, both finish with the results a study run alone gets, and leave every cache readable."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from adaptflow.cli import main
from adaptflow.spec import load_spec
from tasks.prepare import _read_cache, prepare
from tests.conftest import DEMO, ROOT, TINY_TRAINING, cli_overrides, stop

OVERRIDES = [
    "name=concurrent",
    *TINY_TRAINING,
    "episodes.eval_episodes=20",
    "episodes.shots=[1]",
    "target=[webcam]",
    "seeds=[0]",
    "algorithms=[{name: protonet}, {name: source_only}]",
]
CELLS = {("protonet", "webcam", "1", "0"), ("source_only", "webcam", "1", "0")}


def evaluations(client: MlflowClient, experiment: str, parent: str) -> dict[tuple[str, ...], Run]:
    """The evaluation child runs of one study run, by (algorithm, target, shots, seed)."""
    runs = client.search_runs(
        [experiment], f"tags.kind = 'evaluation' and tags.`mlflow.parentRunId` = '{parent}'"
    )
    cells = {
        tuple(run.data.tags[k] for k in ("algorithm", "target_domain", "shots", "seed")): run for run in runs
    }
    assert len(cells) == len(runs), "an evaluation was logged twice in one study run"
    return cells


def accuracies(runs: dict[tuple[str, ...], Run]) -> dict[tuple[str, ...], float]:
    return {cell: run.data.metrics["acc"] for cell, run in runs.items()}


def study_runs(client: MlflowClient, experiment: str) -> list[Run]:
    return client.search_runs([experiment], "tags.kind = 'study'", order_by=["attributes.start_time"])


@pytest.mark.slow
def test_two_runs_of_one_spec_at_once_both_finish_with_the_results_of_one_alone(
    prefect_server: None, tmp_path: Path
) -> None:
    """Both processes share the prepared-data cache, the Prefect result storage (task cache keys and
    checkpoints are the same for both), the sqlite store (created by whichever comes first) and the
    experiment. Both must end FINISHED with every evaluation, equal accuracies, no locked database, and
    caches a later run reads: the cached rerun and a recomputation from scratch give the same numbers."""
    from prefect._internal.result_records import ResultRecord
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_TASKS_REFRESH_CACHE,
        temporary_settings,
    )

    storage, home = tmp_path / "results", tmp_path / "home"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", str(DEMO), "--tracking-uri", uri, *cli_overrides(*OVERRIDES)]
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(storage),
        "ADAPTFLOW_HOME": str(home),  # a prepared-data cache of their own, empty at the start
    }
    logs = [tmp_path / f"run{index}.log" for index in range(2)]
    processes = []
    for log in logs:
        with log.open("w") as output:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "adaptflow.cli", *args],
                    cwd=ROOT,
                    env=env,
                    start_new_session=True,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        for process in processes:
            process.wait(timeout=600)  # minutes only on a machine loaded many times over
    finally:
        for process in processes:
            stop(process, grace=5)
    for log, process in zip(logs, processes, strict=True):
        output = log.read_text()
        assert process.returncode == 0, output
        assert "database is locked" not in output and "Traceback" not in output, output
        assert "unreadable" not in output, output  # no damaged cache or checkpoint was met

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("concurrent").experiment_id
    parents = study_runs(client, experiment)
    assert [run.info.status for run in parents] == ["FINISHED", "FINISHED"]
    together = [evaluations(client, experiment, run.info.run_id) for run in parents]
    for runs in together:
        assert set(runs) == CELLS
        for run in runs.values():
            assert run.info.status == "FINISHED"
            assert client.get_run(run.data.tags["model_run_id"]).info.status == "FINISHED"
    assert accuracies(together[0]) == accuracies(together[1])

    # the caches they wrote are whole: the prepared data reads back as a fresh preparation ...
    spec = load_spec(DEMO, OVERRIDES)
    (entry,) = (home / ".cache" / "prepared").iterdir()  # and no temporary file is left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached = _read_cache(entry)
    fresh = prepare(spec.data, spec.source, spec.target, cache=None)
    assert cached is not None and torch.equal(cached.targets["webcam"].x, fresh.targets["webcam"].x)
    # ... every task result deserialises, and no checkpoint or temporary file is left
    results = sorted(storage.iterdir())
    assert results and all(not path.name.startswith(".") for path in results)
    assert not [path for path in results if path.suffix == ".checkpoint"]
    for path in results:
        ResultRecord.deserialize(path.read_bytes())

    # a third run reuses every cached task; a fourth recomputes them: the same accuracies, every time
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}):
        assert main(args) == 0
        with temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True}):
            assert main(args) == 0
    rerun, alone = (
        evaluations(client, experiment, run.info.run_id) for run in study_runs(client, experiment)[2:]
    )
    assert {run.data.tags["reused_cached_results"] for run in rerun.values()} == {"true"}
    assert {run.data.tags["reused_cached_results"] for run in alone.values()} == {"false"}
    assert accuracies(rerun) == accuracies(alone) == accuracies(together[0])
