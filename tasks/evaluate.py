"""Evaluate: adapt a trained learner to target episodes and score their queries."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
from prefect import task

from metalib import EpisodeSampler, FixedEpisodes, backbones, evaluate, mean_ci95
from metalib.device import resolve_device
from metalib.evaluation import Stopped
from tasks import stopping
from tasks.allocator import keep_freed_memory
from tasks.caching import stable_inputs
from tasks.prepare import Pool
from tasks.train import LearnerSetup, TrainedModel


@dataclass(frozen=True)
class Evaluation:
    """Per-episode accuracies on one target domain at one shot count, and their summary.

    `episodes_digest` fingerprints the target rows (by content) of every support and query set, so a
    paired comparison can check that two evaluations met the same episodes instead of assuming it;
    `normalisation` says how the network normalised a query (metalib.backbones.normalisation).
    """

    accuracies: torch.Tensor
    acc: float
    acc_ci95: float
    seconds: float
    episodes_digest: str
    normalisation: str


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

    `episode_seed` fixes the episodes, so every algorithm meets the same ones. A target with fixed
    episodes (data.fixed_episodes) is evaluated on all of them instead, in order.
    """
    keep_freed_memory()
    resolved = resolve_device(device)
    learner = trained.load(setup, resolved)
    torch.manual_seed(episode_seed)
    sampler: EpisodeSampler | FixedEpisodes
    if target.episode is not None and target.support is not None:
        sampler = FixedEpisodes(target.x, target.y, target.episode, target.support)
        episodes = len(sampler)
    else:
        sampler = EpisodeSampler(target.x, target.y, setup.ways, shots, queries, episode_seed)
    started = time.perf_counter()
    try:
        accuracies = evaluate(learner, sampler, episodes, device=resolved, stop=stopping.STOP_REQUESTED)
    except Stopped as exc:
        return stopping.cancelled(exc)  # a State: Prefect ends the task Cancelled
    acc, ci95 = mean_ci95(accuracies)
    digest = hashlib.sha256(target.x.contiguous().cpu().numpy().tobytes())
    digest.update(target.y.cpu().numpy().tobytes())
    digest.update(sampler.digest().encode())
    seconds = time.perf_counter() - started
    return Evaluation(
        accuracies, acc, ci95, seconds, digest.hexdigest(), backbones.normalisation(learner.net)
    )
