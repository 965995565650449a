"""Meta-training with model selection on source validation episodes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from metalib.algorithms import Algorithm
from metalib.episodes import EpisodeBatch, EpisodeSampler
from metalib.evaluation import episode_accuracies


@dataclass
class TrainingHistory:
    """Metrics by step, and which step's weights were kept."""

    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    best_step: int = 0
    best_val_acc: float = float("nan")

    def add(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.curves.setdefault(name, []).append((step, value))


def meta_train(
    learner: Algorithm,
    sampler: EpisodeSampler,
    *,
    steps: int,
    meta_batch: int,
    validation: EpisodeBatch,
    val_every: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_validate: Callable[[int, float], None] | None = None,
) -> TrainingHistory:
    """Trains for `steps` updates and leaves the learner at its best source-validation weights.

    Validation uses a fixed batch of source episodes, so checkpoints are compared on the
    same episodes; target data never enters here.
    """
    history = TrainingHistory()
    validation = validation.to(device)

    def validate(step: int) -> None:
        acc = episode_accuracies(learner, validation).mean().item()
        history.add(step, {"val/acc": acc})
        if not acc <= history.best_val_acc:  # also true for the first (nan) comparison
            history.best_step, history.best_val_acc = step, acc
            best_state.update(copy.deepcopy(learner.state_dict()))
        if on_validate is not None:
            on_validate(step, acc)

    best_state: dict[str, torch.Tensor] = {}
    validate(0)
    bar = tqdm(range(1, steps + 1), desc=type(learner).__name__, disable=not progress, leave=False)
    for step in bar:
        metrics = learner.meta_train_step(sampler.sample(meta_batch).to(device))
        history.add(step, {f"train/{name}": value for name, value in metrics.items()})
        if step % val_every == 0 or step == steps:
            validate(step)
            bar.set_postfix(val_acc=f"{history.best_val_acc:.3f}")
    learner.load_state_dict(best_state)
    return history
