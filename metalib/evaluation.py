"""Few-shot evaluation: per-episode accuracy, and its mean with a 95% confidence interval."""

from __future__ import annotations

import math

import torch
from scipy import stats

from metalib.algorithms import Algorithm
from metalib.episodes import EpisodeBatch, EpisodeSampler


def episode_accuracies(learner: Algorithm, batch: EpisodeBatch) -> torch.Tensor:
    """Adapts to each episode's support set and scores its queries; returns [T] accuracies."""
    accuracies = []
    for t in range(batch.num_tasks):
        predict = learner.adapt(batch.support_x[t], batch.support_y[t])
        hits = predict(batch.query_x[t]).argmax(-1) == batch.query_y[t]
        accuracies.append(hits.float().mean())
    return torch.stack(accuracies).cpu()


def evaluate(
    learner: Algorithm,
    sampler: EpisodeSampler,
    episodes: int,
    device: torch.device | str = "cpu",
    chunk: int = 100,
) -> torch.Tensor:
    """Accuracy on `episodes` fresh episodes from `sampler`, drawn `chunk` at a time."""
    parts = []
    for start in range(0, episodes, chunk):
        batch = sampler.sample(min(chunk, episodes - start)).to(device)
        parts.append(episode_accuracies(learner, batch))
    return torch.cat(parts)


def mean_ci95(accuracies: torch.Tensor) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% interval, 1.96 * std / sqrt(n)."""
    n = accuracies.numel()
    if n == 0:
        raise ValueError("no episodes to summarise")
    std = accuracies.double().std().item() if n > 1 else 0.0
    return accuracies.double().mean().item(), 1.96 * std / math.sqrt(n)


def paired_t_test(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of a - b and the two-sided p-value of a paired t-test.

    a[i] and b[i] must come from the same episode (same support and query sets), as
    evaluations with the same (seed, target, shots) do.
    """
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(
            f"need two equal-length samples of 2 or more, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    differences = a.double() - b.double()
    mean, std = differences.mean().item(), differences.std().item()
    if std == 0:
        return mean, 1.0 if mean == 0 else 0.0
    t = mean / (std / math.sqrt(differences.numel()))
    return mean, float(2 * stats.t.sf(abs(t), differences.numel() - 1))
