"""maml, anil, metasgd and reptile learn: on Office-Caltech10 SURF features, a short meta-training
run on the source domains (amazon, caltech) lifts 5-way 5-shot accuracy on webcam above chance
and above the same learner before training, by more than the episode noise of either.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from metalib import EpisodeSampler, algorithms, backbones, evaluate, mean_ci95
from metalib.algorithms import Algorithm

DATA = Path(__file__).resolve().parents[1] / "data" / "office_caltech10_surf"
WAYS, SHOTS, QUERIES = 5, 5, 10
CHANCE = 1 / WAYS


def load(domains: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    frame = pd.concat([pd.read_parquet(DATA / f"{domain}.parquet") for domain in domains])
    counts = torch.tensor(np.stack(frame["features"].to_numpy()), dtype=torch.float32)
    return torch.log1p(counts), torch.tensor(frame["label"].to_numpy())


@cache
def source_and_target() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """log1p counts standardised with source statistics only; the target never informs preprocessing."""
    (source_x, source_y), (target_x, target_y) = load(["amazon", "caltech"]), load(["webcam"])
    mean, std = source_x.mean(0), source_x.std(0) + 1e-6
    return ((source_x - mean) / std, source_y), ((target_x - mean) / std, target_y)


def target_accuracy(learner: Algorithm) -> tuple[float, float]:
    """Mean and 95% half-width over 100 target episodes, the same episodes on every call."""
    _, (target_x, target_y) = source_and_target()
    sampler = EpisodeSampler(target_x, target_y, WAYS, SHOTS, QUERIES, seed=1)
    return mean_ci95(evaluate(learner, sampler, episodes=100))


@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("maml", {"lr": 0.005, "inner_lr": 0.1, "inner_steps": 1, "inner_steps_eval": 1}),
        ("anil", {"lr": 0.005, "inner_lr": 0.5, "inner_steps": 1, "inner_steps_eval": 5}),
        ("metasgd", {"lr": 0.005, "inner_lr": 0.1, "inner_steps": 1, "inner_steps_eval": 1}),
        ("reptile", {"inner_lr": 0.1, "inner_steps": 3, "inner_steps_eval": 3, "epsilon": 0.5}),
    ],
    ids=["maml", "anil", "metasgd", "reptile"],
)
def test_meta_training_lifts_target_accuracy(name: str, hparams: dict[str, Any]) -> None:
    torch.manual_seed(0)
    net = backbones.create("mlp", in_features=800, hidden=[64], ways=WAYS)
    learner = algorithms.create(name, net, ways=WAYS, **hparams)
    before, before_ci = target_accuracy(learner)
    (source_x, source_y), _ = source_and_target()
    sampler = EpisodeSampler(source_x, source_y, WAYS, SHOTS, QUERIES, seed=0)
    for _ in range(50):
        learner.meta_train_step(sampler.sample(4))
    after, after_ci = target_accuracy(learner)
    assert after - after_ci > before + before_ci, (
        f"{name}: {before:.3f}±{before_ci:.3f} -> {after:.3f}±{after_ci:.3f}"
    )
    assert after - after_ci > CHANCE + 0.1
