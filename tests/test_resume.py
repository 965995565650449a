"""A training resumes from its checkpoints exactly: inside metalib for every learner, and a study whose
process is SIGKILLed mid-training goes on from the last checkpoint when it is run again."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import metalib.training
from adaptflow.cli import main
from adaptflow.spec import load_spec
from metalib import EpisodeSampler, algorithms, backbones, evaluate
from metalib.evaluation import Stopped
from metalib.training import Checkpoint, NonFiniteLoss, TrainingHistory, meta_train
from tasks.prepare import PreparedData, prepare
from tests.conftest import DEMO, ROOT, cli_overrides, stop


@functools.cache
def office() -> PreparedData:
    spec = load_spec(DEMO, [])
    return prepare(spec.data, spec.source, spec.target)


def train(
    name: str,
    *,
    resume: Checkpoint | None = None,
    keep: list[bytes] | None = None,
    lr: float = 1e-3,
    checkpoint_every: int = 1,
    checkpoint_seconds: float = 0.0,
    stop: threading.Event | None = None,
) -> tuple[dict[str, torch.Tensor], TrainingHistory]:
    """A short training on real features, built and seeded the same way each time."""
    data = office()
    torch.manual_seed(0)
    net = backbones.create("mlp", ways=5, input_shape=data.input_shape, hidden=[32])
    learner = algorithms.create(name, net, ways=5, num_classes=len(data.class_names), lr=lr)
    if learner.uses_unlabelled_target:
        learner.set_unlabelled_target(data.targets["webcam"].x[:40])
    pool, held = data.source_train, data.source_val
    history = meta_train(
        learner,
        EpisodeSampler(pool.x, pool.y, 5, 1, 2, seed=1),
        steps=4,
        meta_batch=2,
        validation=EpisodeSampler(held.x, held.y, 5, 1, 2, seed=2).sample(1),
        val_every=3,
        progress=False,
        checkpoint_every=checkpoint_every,
        checkpoint_seconds=checkpoint_seconds,
        on_checkpoint=None if keep is None else lambda checkpoint: keep.append(checkpoint.to_bytes()),
        resume=resume,
        stop=stop,
    )
    return learner.state_dict(), history


@pytest.mark.parametrize("name", algorithms.names())
def test_a_resumed_training_ends_bit_for_bit_where_an_uninterrupted_one_does(name: str) -> None:
    checkpoints: list[bytes] = []
    weights, history = train(name, keep=checkpoints)
    assert [Checkpoint.from_bytes(data).step for data in checkpoints] == [1, 2, 3, 4]
    # from between validations: optimiser, generators, best weights so far and history all restored
    resumed, resumed_history = train(name, resume=Checkpoint.from_bytes(checkpoints[0]))
    assert resumed.keys() == weights.keys()
    for key, value in weights.items():  # tensors, and a learner's extra state (dann's warm-up step)
        assert torch.equal(resumed[key], value) if torch.is_tensor(value) else resumed[key] == value, key
    assert resumed_history == history  # the same curves, each step once


class ArrivesDuringFirstStep(threading.Event):
    """A stop request made while the first training step runs: unset when asked at the start, set after."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked > 1


def test_a_stop_request_ends_training_and_evaluation_and_the_training_resumes_from_it() -> None:
    """The event an interrupted study sets (tasks/stopping.py): the training step in progress ends and is
    checkpointed, though no checkpoint is scheduled, and the resumed training ends where an
    uninterrupted one does; a training asked before it begins stops without a step or a checkpoint; an
    evaluation stops before its next chunk."""
    checkpoints: list[bytes] = []
    with pytest.raises(Stopped, match="ProtoNet stopped at step 1 of 4"):
        train("protonet", keep=checkpoints, checkpoint_every=0, stop=ArrivesDuringFirstStep())
    assert [Checkpoint.from_bytes(data).step for data in checkpoints] == [1]
    weights, _ = train("protonet")
    resumed, _ = train("protonet", resume=Checkpoint.from_bytes(checkpoints[0]))
    assert all(torch.equal(resumed[key], value) for key, value in weights.items())

    stop = threading.Event()
    stop.set()  # before a training begins (a task queued behind the interrupted one): no step, no checkpoint
    with pytest.raises(Stopped, match="ProtoNet stopped before step 1 of 4"):
        train("protonet", keep=checkpoints, checkpoint_every=0, stop=stop)
    assert len(checkpoints) == 1

    learner = algorithms.create(
        "protonet", backbones.create("mlp", ways=5, input_shape=office().input_shape), ways=5
    )
    target = office().targets["webcam"]
    with pytest.raises(Stopped, match="after 0 of 10 episodes"):
        evaluate(learner, EpisodeSampler(target.x, target.y, 5, 1, 2, seed=3), 10, stop=stop)


def test_checkpoints_come_no_closer_than_checkpoint_seconds_but_a_stop_always_writes_one() -> None:
    checkpoints: list[bytes] = []
    train("protonet", keep=checkpoints, checkpoint_seconds=3600)
    assert checkpoints == []  # every step was due (and step 3 validated), none an hour after the start
    with pytest.raises(Stopped, match="ProtoNet stopped at step 1 of 4"):
        train("protonet", keep=checkpoints, checkpoint_seconds=3600, stop=ArrivesDuringFirstStep())
    assert [Checkpoint.from_bytes(data).step for data in checkpoints] == [1]


def test_a_due_checkpoint_is_written_once_checkpoint_seconds_have_passed_since_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A clock that moves 1 s each time training reads it: at the start (0), at each due step and after
    each checkpoint. With 2.5 s, steps 1 and 2 (1 s, 2 s) are too soon, step 3 (3 s) is written and
    resets the clock (4 s), and step 4 (5 s) is too soon again."""
    ticks = iter(range(100))
    monkeypatch.setattr(metalib.training, "monotonic", lambda: float(next(ticks)))
    checkpoints: list[bytes] = []
    train("protonet", keep=checkpoints, checkpoint_seconds=2.5)
    assert [Checkpoint.from_bytes(data).step for data in checkpoints] == [3]


def test_a_nan_loss_stops_the_training_naming_the_learner_and_the_step() -> None:
    with pytest.raises(NonFiniteLoss, match=r"loss of ProtoNet is nan at step 2 of 4"):
        train("protonet", lr=1e30)


def checkpoint_steps(storage: Path) -> list[int]:
    steps = []
    for path in storage.glob("*.checkpoint"):
        try:
            steps.append(Checkpoint.from_bytes(path.read_bytes()).step)
        except Exception:  # renamed over while being read
            continue
    return steps


@pytest.mark.slow
def test_a_sigkilled_study_resumes_its_training_and_ends_its_stale_run(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL the study process once a checkpoint exists; the rerun trains only the steps after it, ends
    the dead study's parent run KILLED, and gives the weights and metrics of an uninterrupted training."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_TASKS_REFRESH_CACHE,
        temporary_settings,
    )

    storage = tmp_path / "results"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "run", str(DEMO), "--tracking-uri", uri,
        *cli_overrides(
            "name=killed", "train.steps=300", "train.val_every=100", "train.meta_batch=2",
            "train.val_episodes=5", "train.checkpoint_seconds=0", "episodes.eval_episodes=10",
            "episodes.shots=[1]", "target=[webcam]",
            "seeds=[0]",
            "algorithms=[{name: protonet}]",
        ),
    ]  # fmt: skip
    # the session's Prefect server, and result storage of this test's own
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(storage),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "adaptflow.cli", *args], cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 240
    try:
        while not any(step >= 100 for step in checkpoint_steps(storage)):
            assert process.poll() is None, "the study ended before it could be killed"
            assert time.time() < deadline, "no checkpoint was written in time"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)  # SIGKILL: nothing in the process can clean up
        process.wait(10)
    finally:
        stop(process, grace=1)
    (killed_at,) = checkpoint_steps(storage)
    assert 100 <= killed_at < 300

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("killed").experiment_id
    (dead,) = client.search_runs([experiment], "tags.kind = 'study'")
    assert dead.info.status == "RUNNING"  # what SIGKILL leaves behind

    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}):
        assert main(args) == 0
        assert not checkpoint_steps(storage)  # done: the checkpoint is gone, the result is cached
        with temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True}):
            assert main(args) == 0  # the uninterrupted reference: trained again from step 0

    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    # one model run: the reference's weights have the digest of the resumed ones, bit for bit
    models = client.search_runs([experiment], "tags.kind = 'model'")
    assert [run.data.tags["resumed_from_step"] for run in models] == [str(killed_at)]
    children = client.search_runs(
        [experiment], "tags.kind = 'evaluation'", order_by=["attributes.start_time"]
    )
    resumed, reference = children

    def results(run: mlflow.entities.Run) -> dict[str, float]:
        return {key: value for key, value in run.data.metrics.items() if not key.endswith("_seconds")}

    assert results(resumed) == results(reference) and "acc" in results(resumed)
    for run in children:
        assert run.data.tags["model_run_id"] == models[0].info.run_id
    steps = [point.step for point in client.get_metric_history(models[0].info.run_id, "train/loss")]
    assert steps == list(range(1, 301))  # every step once, none twice
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # MLflow resolves models:/<id> with the global URI
    model = mlflow.artifacts.download_artifacts(resumed.data.tags["model_uri"])
    assert (Path(model) / "weights.pt").is_file()
