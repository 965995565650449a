"""Evaluate: adapt a trained learner to target episodes and score their queries."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from prefect import task

from metalib import EpisodeSampler, evaluate, mean_ci95
from metalib.device import resolve_device
from tasks.caching import stable_inputs
from tasks.prepare import Pool
from tasks.train import LearnerSetup, TrainedModel


@dataclass(frozen=True)
class Evaluation:
    """Per-episode accuracies on one target domain at one shot count, and their summary."""

    accuracies: torch.Tensor
    acc: float
    acc_ci95: float
    seconds: float


@task(name="evaluate", cache_policy=stable_inputs(), persist_result=True)
def evaluate_model(
    setup: LearnerSetup,
    trained: TrainedModel,
    target: Pool,
    shots: int,
    queries: int,
    episodes: int,
    episode_seed: int,
    device: str = "auto",
) -> Evaluation:
    """`episodes` target episodes, each adapted to on its support set and scored on its queries.

    `episode_seed` fixes the episodes, so every algorithm meets the same ones.
    """
    resolved = resolve_device(device)
    learner = trained.load(setup, resolved)
    torch.manual_seed(episode_seed)
    sampler = EpisodeSampler(target.x, target.y, setup.ways, shots, queries, episode_seed)
    started = time.perf_counter()
    accuracies = evaluate(learner, sampler, episodes, device=resolved)
    acc, ci95 = mean_ci95(accuracies)
    return Evaluation(accuracies, acc, ci95, time.perf_counter() - started)
