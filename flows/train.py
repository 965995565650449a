"""The `train` flow: meta-trains one (algorithm, seed) of a study on the host that runs it.

Its `gpu` deployment (prefect.yaml) is what a `study` or `sweep` deployment run calls through
`run_deployment` when the study asks for `train.device: cuda`: training runs on a GPU worker,
while data preparation, evaluation and reporting stay on the CPU pool. The trained model comes
back through the result storage both pools share, and the train task's cache lives there too.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from adaptflow.spec import parse_spec
from flows.study import plan_study, training_inputs
from tasks.train import TrainedModel, train_model


@flow(name="train", log_prints=True, persist_result=True)
def train(spec: dict[str, Any], algorithm: int, seed: int, target: str | None = None) -> TrainedModel:
    """Trains `spec.algorithms[algorithm]` with `seed` (and, for dann, on `target`'s unlabelled rows);
    the data preparation is a cache hit when the study already prepared it."""
    plan = plan_study(parse_spec(spec))
    return train_model(**training_inputs(plan, plan.setups[algorithm], seed, target))
