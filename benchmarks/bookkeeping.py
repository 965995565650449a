"""What two pieces of a study's bookkeeping cost, at the demo's model size, by the length of the training.

1. A Prefect task call that takes a trained model (as every evaluation and logging task does), on the
   temporary server: Prefect walks the task's inputs for futures (`visit_collection`) before it runs,
   and under its default cache policy hashes them; the logging tasks say NO_CACHE.
2. One training checkpoint of each demo learner (weights, Adam's moments, best weights, the history):
   `Checkpoint.to_bytes` and the write to a file, as `tasks/checkpoints.py` does.
3. Logging one trained model in a new sqlite MLflow store (`log_model`'s body: the model run, its
   curves and plot, the logged model and its registration), as the study flow's thread does after
   each training.

    .venv/bin/python benchmarks/bookkeeping.py            # steps 300 (the demo) and 3000
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from adaptflow.spec import load_spec  # noqa: E402
from flows.server import shared_prefect_server  # noqa: E402
from flows.study import check_study  # noqa: E402
from metalib.training import Checkpoint, TrainingHistory  # noqa: E402
from tasks.models import log_model  # noqa: E402
from tasks.prepare import prepare  # noqa: E402
from tasks.tracking import StudyRun, open_store  # noqa: E402
from tasks.train import LearnerSetup, TrainedModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CALLS = 20


@functools.cache
def demo_setups() -> list[LearnerSetup]:
    spec = load_spec(ROOT / "studies/demo.yaml", [])
    return check_study(spec, prepare(spec.data, spec.source, spec.target)).setups


def history(steps: int, val_every: int = 50) -> TrainingHistory:
    """A history of `steps` training steps shaped like meta_train's: two curves a step, one a validation."""
    made = TrainingHistory()
    for step in range(1, steps + 1):
        made.add(step, {"train/loss": 0.1, "train/acc": 0.5})
        if step % val_every == 0:
            made.add(step, {"val/acc": 0.5})
    return made


@task
def takes_a_model(trained: TrainedModel) -> float:
    return trained.seconds


@task(cache_policy=NO_CACHE)
def takes_a_model_uncached(trained: TrainedModel) -> float:
    return trained.seconds


@flow
def task_calls(steps: list[int]) -> None:
    state = demo_setups()[0].build().state_dict()
    for count in steps:
        trained = TrainedModel(state, history(count), 1.0)
        for policy, call in (("default", takes_a_model), ("NO_CACHE", takes_a_model_uncached)):
            call(trained)  # the first call of a task registers it
            started = time.perf_counter()
            for _ in range(CALLS):
                call(trained)
            each = (time.perf_counter() - started) / CALLS
            print(f"a task call taking a {count}-step model, {policy} cache policy: {each * 1000:.1f} ms")


def checkpoints(setups: list[LearnerSetup], steps: int) -> None:
    for setup in setups:
        learner = setup.build()
        for parameter in learner.parameters():
            parameter.grad = torch.zeros_like(parameter)
        learner.optimizer.step()  # Adam's moments exist, as after a training step
        best = {name: value.clone() for name, value in learner.state_dict().items()}
        rng = torch.get_rng_state()
        made = history(steps)
        folder = Path(tempfile.mkdtemp())
        started = time.perf_counter()
        for _ in range(CALLS):
            data = Checkpoint(
                steps, learner.state_dict(), learner.optimizer.state_dict(), rng, rng, [], best, made
            ).to_bytes()
        serialised = time.perf_counter()
        for _ in range(CALLS):
            (folder / "checkpoint").write_bytes(data)
        written = time.perf_counter()
        to_bytes, write = (serialised - started) / CALLS, (written - serialised) / CALLS
        print(
            f"checkpoint of {setup.label} after {steps} steps: {len(data) / 1e6:.1f} MB, "
            f"to_bytes {to_bytes * 1000:.1f} ms, write {write * 1000:.1f} ms"
        )


def model_logging(setup: LearnerSetup, steps: int, models: int = 5) -> None:
    folder = Path(tempfile.mkdtemp())
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = open_store(uri)
    experiment_id = client.create_experiment("bookkeeping")
    study = StudyRun(uri, experiment_id, client.create_run(experiment_id).info.run_id)
    log_model.fn(study, setup, TrainedModel(setup.build().state_dict(), history(steps), -1.0), -1, None)
    started = time.perf_counter()  # after a first model, which imports and sets up the plotting
    for seed in range(models):  # other weights each time: each is a new model run
        log_model.fn(study, setup, TrainedModel(setup.build().state_dict(), history(steps), 1.0), seed, None)
    each = (time.perf_counter() - started) / models
    print(f"logging a {setup.label} model trained {steps} steps: {each * 1000:.0f} ms")


def main() -> None:
    setups = demo_setups()
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, demo learners {[s.label for s in setups]}")
    for steps in (300, 3000):
        checkpoints(setups, steps)
        model_logging(setups[-1], steps)
    with shared_prefect_server():
        task_calls([300, 3000])


if __name__ == "__main__":
    main()
