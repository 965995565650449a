"""A trained model handed to a task: Prefect's walk of the task's inputs does not grow with the length of
its training, and the model's cache token still tells one training history from another."""

from __future__ import annotations

import json

import torch
from prefect.utilities.collections import visit_collection

from metalib import TrainingHistory
from tasks.caching import stable_token
from tasks.train import TrainedModel


def trained(steps: int, loss: float = 0.5) -> TrainedModel:
    history = TrainingHistory()
    for step in range(steps):
        history.add(step, {"train/loss": loss, "train/acc": 0.25})
    history.add(steps, {"val/acc": 0.5})
    history.best_step, history.best_val_acc = steps, 0.5
    return TrainedModel({"net.weight": torch.ones(4, 3), "net.bias": torch.zeros(4)}, history, 1.0)


def items_prefect_visits(value: object) -> list[object]:
    """The items Prefect's input resolution visits in `value` (the walk runs before every task)."""
    visited: list[object] = []

    def keep(item: object) -> object:
        visited.append(item)
        return item

    visit_collection(value, keep, return_data=False)
    return visited


def test_prefect_does_not_walk_a_trained_models_history() -> None:
    short, long = trained(3), trained(3000)
    assert len(items_prefect_visits(long)) == len(items_prefect_visits(short))
    # the walk still reaches the weights, where a future or a state could be
    assert any(item is long.state["net.weight"] for item in items_prefect_visits(long))


def test_a_trained_models_cache_token_follows_its_history() -> None:
    token = json.dumps(stable_token(trained(30)))
    assert json.dumps(stable_token(trained(30))) == token
    assert json.dumps(stable_token(trained(31))) != token
    assert json.dumps(stable_token(trained(30, loss=0.4))) != token


def test_a_training_history_survives_json_and_compares_by_value() -> None:
    history = trained(5).history
    again = TrainingHistory.from_dict(json.loads(json.dumps(history.to_dict())))
    assert again == history
    assert again.curves["val/acc"] == [(5, 0.5)]
    again.add(6, {"val/acc": 0.75})
    assert again != history
