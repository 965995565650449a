"""MLflow run states tell the truth: a diverging training fails alone and is recorded, a half-logged
evaluation ends FAILED and compare skips it, runs of dead processes end KILLED, models are stored once."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from prefect.states import State

from adaptflow.cli import main
from adaptflow.spec import load_spec
from flows.study import ended_if_stopped, plan_study, training_inputs
from metalib.seeding import derive_seed
from tasks.compare import load_runs
from tasks.evaluate import evaluate_model
from tasks.models import ModelRef
from tasks.report import log_evaluation
from tasks.run_states import OWNER_TAG, end_stale_runs, owner
from tasks.stopping import STOP_REQUESTED
from tasks.tracking import StudyRun
from tasks.train import TrainedModel, train_model
from tests.conftest import DEMO, TINY_TRAINING, cli_overrides

OVERRIDES = [
    *TINY_TRAINING,
    "name=diverging",
    "episodes.eval_episodes=20",
    "episodes.shots=[1]",
    "target=[webcam]",
    "seeds=[0]",
    "algorithms=[{name: protonet, label: diverges, lr: 1.0e+30}, {name: protonet}]",
]

Study = tuple[str, Path, str]  # tracking URI, folder, what the command printed on stderr


@pytest.fixture(scope="module")
def diverging_study(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Study:
    """A study in which one of two trainings diverges at its second step."""
    folder = tmp_path_factory.mktemp("diverging")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    stderr = folder / "stderr.txt"
    with stderr.open("w") as stream:
        sys.stderr, saved = stream, sys.stderr
        try:
            code = main(["run", str(DEMO), *cli_overrides(*OVERRIDES), "--tracking-uri", uri])
        finally:
            sys.stderr = saved
    assert code == 2
    return uri, folder, stderr.read_text()


@pytest.mark.slow
def test_a_diverging_training_fails_alone_and_is_recorded(diverging_study: Study) -> None:
    uri, _, stderr = diverging_study
    assert "training diverges, seed 0: the training loss of ProtoNet is nan at step 2 of 10; lower" in stderr
    assert "1 failure(s), recorded as FAILED runs in MLflow; 1 evaluations finished" in stderr
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("diverging").experiment_id
    (parent,) = client.search_runs([experiment], "tags.kind = 'study'")
    assert parent.info.status == "FAILED"
    models = {
        run.data.tags["algorithm"]: run for run in client.search_runs([experiment], "tags.kind = 'model'")
    }
    assert models["diverges"].info.status == "FAILED"
    assert "nan at step 2" in models["diverges"].data.tags["error"]
    assert models["protonet"].info.status == "FINISHED"
    (evaluation,) = client.search_runs([experiment], "tags.kind = 'evaluation'")
    assert evaluation.data.tags["algorithm"] == "protonet" and evaluation.info.status == "FINISHED"
    # the weights are stored once, in the model run, and the evaluation refers to it
    assert evaluation.data.tags["model_run_id"] == models["protonet"].info.run_id
    model_id = models["protonet"].data.tags["model_id"]
    assert evaluation.data.tags["model_uri"] == f"models:/{model_id}"
    assert "weights.pt" not in {item.path for item in client.list_artifacts(evaluation.info.run_id)}
    assert [item.path for item in client.list_artifacts(models["protonet"].info.run_id)] == [
        "learning_curve.png"
    ]
    logged = client.get_logged_model(model_id)
    assert logged.status == LoggedModelStatus.READY and logged.source_run_id == models["protonet"].info.run_id
    assert {item.path for item in client.list_logged_model_artifacts(model_id)} == {
        "weights.pt", "setup.json", "history.json"
    }  # fmt: skip
    # the run's outputs list it (MLflow's "Models" column), and its registered version links back
    outputs = client.get_run(models["protonet"].info.run_id).outputs.model_outputs
    assert [output.model_id for output in outputs] == [model_id]
    (version,) = client.search_model_versions(f"run_id = '{models['protonet'].info.run_id}'")
    linked = json.loads(logged.tags["mlflow.modelVersions"])
    assert linked == [{"name": version.name, "version": version.version}]


@pytest.mark.slow
def test_a_half_logged_evaluation_ends_failed_and_compare_skips_it(
    diverging_study: Study, caplog: pytest.LogCaptureFixture
) -> None:
    """The artifact store fails while an evaluation is logged: the run ends FAILED, without `acc`."""
    uri, folder, _ = diverging_study
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("diverging").experiment_id
    (parent,) = client.search_runs([experiment], "tags.kind = 'study'")
    (model,) = client.search_runs([experiment], "tags.kind = 'model' and attributes.status = 'FINISHED'")
    plan = plan_study(load_spec(DEMO, OVERRIDES))
    setup = plan.setups[1]
    trained = train_model(**training_inputs(plan, setup, 0))  # cached by the study: the same model
    evaluation = evaluate_model(
        setup, trained, plan.prepared.targets["webcam"], shots=1, queries=3, episodes=20,
        episode_seed=derive_seed(0, "evaluation", "webcam", 1), device="cpu",
    )  # fmt: skip
    artifacts = folder / "mlruns"
    artifacts.rename(artifacts.with_suffix(".away"))
    artifacts.write_text("the artifact store is gone")  # every artifact upload fails
    try:
        with pytest.raises(OSError):
            log_evaluation(
                StudyRun(uri, experiment, parent.info.run_id), plan.spec, setup, trained, evaluation,
                seed=0, target="webcam", shots=1, flow_run_id="test", modality="features", cached=True,
                model=ModelRef(model.info.run_id, model.data.tags["model_id"]),
            )  # fmt: skip
    finally:
        artifacts.unlink()
        artifacts.with_suffix(".away").rename(artifacts)
    half = client.search_runs([experiment], "tags.kind = 'evaluation' and attributes.status = 'FAILED'")
    assert len(half) == 1 and "acc" not in half[0].data.metrics
    with caplog.at_level(logging.WARNING, logger="tasks.compare"):
        runs = load_runs(client, "diverging")
    assert list(runs.algorithm) == ["protonet"] and len(runs.accuracies[0]) == 20
    assert f"skipping 1 incomplete evaluation run(s) (not FINISHED with acc): {half[0].info.run_name}" in (
        caplog.text
    )


def test_a_stopped_training_and_evaluation_end_cancelled_and_cache_nothing(diverging_study: Study) -> None:
    """A task stopped by an interruption ends Cancelled, and the rerun computes it (from its checkpoint)
    instead of taking the stopped task's empty result from the cache as a finished one."""
    plan = plan_study(load_spec(DEMO, OVERRIDES))
    setup = plan.setups[1]
    # a seed no other test trains (test_workers trains seed 1 alike), so not cached
    seed = 1_000_003
    inputs = training_inputs(plan, setup, seed)
    target = plan.prepared.targets["webcam"]

    def evaluation(trained: object) -> State:
        return evaluate_model(
            setup, trained, target, shots=1, queries=3, episodes=20,
            episode_seed=derive_seed(seed, "evaluation", "webcam", 1), device="cpu", return_state=True,
        )  # fmt: skip

    STOP_REQUESTED.set()
    try:
        stopped = train_model(**inputs, return_state=True)
        assert stopped.is_cancelled() and stopped.message == "ProtoNet stopped before step 1 of 10"
    finally:
        STOP_REQUESTED.clear()
    trained = train_model(**inputs, return_state=True)
    assert trained.is_completed() and trained.name != "Cached" and isinstance(trained.result(), TrainedModel)
    STOP_REQUESTED.set()
    try:
        stopped = evaluation(trained.result())
        assert stopped.is_cancelled() and stopped.message == "evaluation stopped after 0 of 20 episodes"
    finally:
        STOP_REQUESTED.clear()
    evaluated = evaluation(trained.result())
    assert (
        evaluated.is_completed() and evaluated.name != "Cached" and len(evaluated.result().accuracies) == 20
    )


def test_runs_of_a_dead_process_end_killed_and_live_ones_are_left_alone(tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("stale", artifact_location=(tmp_path / "mlruns").as_uri())
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead = owner().rsplit(":", 1)[0] + ":" + finished.stdout.decode().strip()  # a process that has exited
    stale = client.create_run(experiment, tags={"kind": "study", OWNER_TAG: dead}).info.run_id
    child = client.create_run(experiment, tags={"mlflow.parentRunId": stale}).info.run_id
    live = client.create_run(experiment, tags={"kind": "study", OWNER_TAG: owner()}).info.run_id
    elsewhere = client.create_run(experiment, tags={"kind": "study", OWNER_TAG: "other-host:1"}).info.run_id
    assert sorted(end_stale_runs(client, experiment)) == sorted([stale, child])
    status = {run: client.get_run(run).info.status for run in (stale, child, live, elsewhere)}
    assert status == {stale: "KILLED", child: "KILLED", live: "RUNNING", elsewhere: "RUNNING"}
    assert os.getpid() == int(owner().rsplit(":", 1)[1])


class FailingCleanUp:
    """A clean-up that fails on the way out, as an HTTP client or a database session an interruption
    left half-way through a request does."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        raise ConnectionError("the connection was left half-way")


def timed_out() -> TimeoutError:
    """What `asyncio.wait_for` raises on a timeout: an error caused by a BaseException that is no
    interruption."""
    error = TimeoutError()
    error.__cause__ = asyncio.CancelledError()
    return error


@pytest.mark.parametrize(
    ("raised", "status", "seen"),
    [
        (KeyboardInterrupt(), "KILLED", KeyboardInterrupt),
        (ValueError(), "FAILED", ConnectionError),
        (timed_out(), "FAILED", ConnectionError),
    ],
)
def test_an_interruption_a_clean_up_error_replaced_still_ends_the_run_killed(
    raised: BaseException, status: str, seen: type[BaseException], tmp_path: Path
) -> None:
    """Ctrl-C or SIGTERM can land inside a request, whose clean-up then raises its own error on the
    way out: the study's run must still end KILLED and the user see the interruption (the CLI's
    "interrupted" and exit code 130), not FAILED and a traceback. An error that is no interruption,
    also one with a BaseException behind it (a timeout's CancelledError), still ends the run FAILED
    with the error that surfaced."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("interrupted", artifact_location=(tmp_path / "mlruns").as_uri())
    run = StudyRun(uri, experiment, client.create_run(experiment).info.run_id)
    try:
        with pytest.raises(seen), ended_if_stopped(run), FailingCleanUp():
            raise raised
    finally:
        STOP_REQUESTED.clear()
    assert client.get_run(run.run_id).info.status == status
