"""Meta-training with model selection on source validation episodes, resumable from checkpoints."""

from __future__ import annotations

import copy
import io
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic
from typing import Any

import torch
from tqdm.auto import tqdm

from metalib.algorithms import Algorithm
from metalib.episodes import EpisodeBatch, EpisodeSampler
from metalib.evaluation import Stopped, episode_accuracies


class TrainingHistory:
    """Metrics by step, and which step's weights were kept.

    Not a dataclass, on purpose: Prefect walks every list, dict and dataclass among a task's inputs
    looking for futures (`visit_collection`, 9 us an item here), and a trained model goes into every
    evaluation and logging task. It descends into this object's fields no more than into a tensor's,
    so it no longer visits each (step, value) pair of the curves each time (docs/benchmarks.md)."""

    def __init__(
        self,
        curves: dict[str, list[tuple[int, float]]] | None = None,
        best_step: int = 0,
        best_val_acc: float = float("nan"),
    ) -> None:
        self.curves = {} if curves is None else curves
        self.best_step = best_step
        self.best_val_acc = best_val_acc

    def add(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.curves.setdefault(name, []).append((step, value))

    def to_dict(self) -> dict[str, Any]:
        """The fields, not copied: for torch.save, JSON and cache keys."""
        return {"curves": self.curves, "best_step": self.best_step, "best_val_acc": self.best_val_acc}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainingHistory:
        """Back from `to_dict` after a round trip through torch.save or JSON (pairs as lists)."""
        curves = {
            name: [(int(step), value) for step, value in points] for name, points in saved["curves"].items()
        }
        return cls(curves, saved["best_step"], saved["best_val_acc"])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrainingHistory):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        points = {name: len(curve) for name, curve in self.curves.items()}
        return f"TrainingHistory(best_step={self.best_step}, best_val_acc={self.best_val_acc}, {points=})"


class NonFiniteLoss(ArithmeticError):
    """A training step's loss was NaN or infinite: the weights it would leave are useless."""


@dataclass
class Checkpoint:
    """Everything `meta_train` needs to go on after `step` exactly as if it had not stopped: the
    learner's and its optimiser's state, the episode sampler's and torch's random generators, the
    best weights so far and the history. Holds live tensors: store it (`to_bytes`) when handed one."""

    step: int
    learner: dict[str, Any]
    optimizer: dict[str, Any]
    sampler_rng: torch.Tensor
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]
    best: dict[str, Any]
    history: TrainingHistory

    def to_bytes(self) -> bytes:
        """Plain containers and tensors only, so `from_bytes` can load with weights_only=True. The
        history's fields go as they are: a deep copy of every (step, value) pair of its curves made
        checkpoints cost more with each step (docs/benchmarks.md)."""
        buffer = io.BytesIO()
        torch.save({**vars(self), "history": self.history.to_dict()}, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        fields = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        history = TrainingHistory.from_dict(fields.pop("history"))
        return cls(**fields, history=history)


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
    checkpoint_every: int = 0,
    checkpoint_seconds: float = 0.0,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    resume: Checkpoint | None = None,
    stop: threading.Event | None = None,
) -> TrainingHistory:
    """Trains for `steps` updates and leaves the learner at its best source-validation weights.

    Validation uses a fixed batch of source episodes, so checkpoints are compared on the same episodes;
    target data never enters here. `on_checkpoint` gets a checkpoint after each validation and every
    `checkpoint_every` steps, unless the last one (or the start) is less than `checkpoint_seconds` old:
    the demo's learners validate every 0.2-0.3 s of training, and a checkpoint at each cost a few
    percent of it (docs/benchmarks.md). Given one as `resume` (with a learner built and seeded as
    before), training goes on from its step and ends with the same weights, bit for bit on CPU, as a
    run that never stopped. Raises NonFiniteLoss, naming the learner and the
    step, when a loss is NaN or infinite. Once `stop` is set (from another thread), training checkpoints
    at the end of the current step, however recent the last checkpoint, and raises Stopped, so a resume
    loses nothing; set before training begins, it raises Stopped at once.
    """
    device = torch.device(device)
    learner.training_steps = steps
    history = TrainingHistory()
    best_state: dict[str, torch.Tensor] = {}
    validation = validation.to(device)
    first = 1
    if resume is not None:
        learner.load_state_dict(resume.learner)
        learner.optimizer.load_state_dict(resume.optimizer)
        sampler.generator.set_state(resume.sampler_rng)
        torch.set_rng_state(resume.torch_rng)
        if resume.cuda_rng:
            torch.cuda.set_rng_state_all(resume.cuda_rng)
        best_state, history, first = resume.best, resume.history, resume.step + 1

    def validate(step: int) -> None:
        acc = episode_accuracies(learner, validation).mean().item()
        history.add(step, {"val/acc": acc})
        if not acc <= history.best_val_acc:  # also true for the first (nan) comparison
            history.best_step, history.best_val_acc = step, acc
            best_state.update(copy.deepcopy(learner.state_dict()))
        if on_validate is not None:
            on_validate(step, acc)

    def checkpoint(step: int) -> None:
        if on_checkpoint is not None:
            on_checkpoint(
                Checkpoint(
                    step=step,
                    learner=learner.state_dict(),
                    optimizer=learner.optimizer.state_dict(),
                    sampler_rng=sampler.generator.get_state(),
                    torch_rng=torch.get_rng_state(),
                    cuda_rng=torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                    best=best_state,
                    history=history,
                )
            )

    name = type(learner).__name__
    if stop is not None and stop.is_set():  # asked before it began (a queued task): nothing to save
        raise Stopped(f"{name} stopped before step {first} of {steps}")
    if resume is None:
        validate(0)
    bar = tqdm(range(first, steps + 1), desc=name, disable=not progress, leave=False)
    last_checkpoint = monotonic()
    for step in bar:
        metrics = learner.meta_train_step(sampler.sample(meta_batch).to(device))
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLoss(f"the training loss of {name} is {metrics['loss']} at step {step} of {steps}")
        history.add(step, {f"train/{key}": value for key, value in metrics.items()})
        validated = step % val_every == 0 or step == steps
        if validated:
            validate(step)
            bar.set_postfix(val_acc=f"{history.best_val_acc:.3f}")
        stopping = stop is not None and stop.is_set()
        due = validated or (checkpoint_every and step % checkpoint_every == 0)
        if stopping or (due and monotonic() - last_checkpoint >= checkpoint_seconds):
            checkpoint(step)
            last_checkpoint = monotonic()
        if stopping:
            resumes = "; its checkpoint resumes it" if on_checkpoint is not None else ""
            raise Stopped(f"{name} stopped at step {step} of {steps}{resumes}")
    learner.load_state_dict(best_state)
    return history
