"""Few-shot evaluation: per-episode accuracy (metalib.statistics summarises it)."""

from __future__ import annotations

import threading

import torch

from metalib.algorithms import Algorithm
from metalib.episodes import EpisodeBatch, EpisodeSampler, FixedEpisodes


class Stopped(Exception):
    """The caller asked training or evaluation to stop (its `stop` event was set from another thread)."""


def episode_accuracies(
    learner: Algorithm, batch: EpisodeBatch, rows_per_pass: int | None = None
) -> torch.Tensor:
    """Adapts to every episode's support set and scores its queries; returns [T] accuracies.

    Episodes are adapted to together, as many at once as have `rows_per_pass` rows (at least one;
    by default the learner's `rows_per_pass`).
    """
    rows = rows_per_pass or learner.rows_per_pass
    step = max(1, rows // (batch.support_x.shape[1] + batch.query_x.shape[1]))
    parts = []
    for start in range(0, batch.num_tasks, step):
        part = slice(start, start + step)
        predict = learner.adapt_batch(batch.support_x[part], batch.support_y[part])
        parts.append((predict(batch.query_x[part]).argmax(-1) == batch.query_y[part]).float().mean(1))
    return torch.cat(parts).cpu()


def evaluate(
    learner: Algorithm,
    sampler: EpisodeSampler | FixedEpisodes,
    episodes: int,
    device: torch.device | str = "cpu",
    chunk: int = 100,
    stop: threading.Event | None = None,
) -> torch.Tensor:
    """Accuracy on the next `episodes` episodes from `sampler`, taken up to `chunk` at a time.
    Raises Stopped before the next chunk once `stop` is set."""
    parts: list[torch.Tensor] = []
    done = 0
    while done < episodes:
        if stop is not None and stop.is_set():
            raise Stopped(f"evaluation stopped after {done} of {episodes} episodes")
        batch = sampler.sample(min(chunk, episodes - done)).to(device)
        parts.append(episode_accuracies(learner, batch))
        done += batch.num_tasks
    return torch.cat(parts)
