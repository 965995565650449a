"""The episode sampler, the source split and the summary statistics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from scipy import stats

from adaptflow.spec import load_spec
from metalib import EpisodeSampler, episode_shape_problems, mean_ci95, split_per_class
from tasks.caching import StableInputs
from tasks.prepare import prepare
from tasks.train import LearnerSetup, source_episodes
from tests.conftest import DEMO


def pool(classes: int = 6, per_class: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(classes).repeat_interleave(per_class)
    x = torch.arange(len(y), dtype=torch.float32)[:, None]  # x holds the row index
    return x, y


def test_episode_shapes_labels_and_disjoint_support_query() -> None:
    x, y = pool()
    batch = EpisodeSampler(x, y, ways=4, shots=2, queries=3, seed=0).sample(7)
    assert batch.support_x.shape == (7, 8, 1) and batch.query_x.shape == (7, 12, 1)
    assert batch.classes.shape == (7, 4)
    for t in range(7):
        support_rows = set(batch.support_x[t, :, 0].long().tolist())
        query_rows = set(batch.query_x[t, :, 0].long().tolist())
        assert not support_rows & query_rows
        assert len(support_rows) == 8 and len(query_rows) == 12
        # episode-local label k means global class classes[t, k]
        global_support, global_query = batch.global_labels()
        assert torch.equal(y[batch.support_x[t, :, 0].long()], global_support[t])
        assert torch.equal(y[batch.query_x[t, :, 0].long()], global_query[t])
        assert sorted(batch.support_y[t].tolist()) == sorted([0, 1, 2, 3] * 2)


def test_same_seed_same_episodes_other_seed_other_episodes() -> None:
    x, y = pool()
    first = EpisodeSampler(x, y, 3, 1, 2, seed=5).sample(10)
    again = EpisodeSampler(x, y, 3, 1, 2, seed=5).sample(10)
    other = EpisodeSampler(x, y, 3, 1, 2, seed=6).sample(10)
    assert all(torch.equal(a, b) for a, b in zip(first.tensors(), again.tensors()))
    assert not torch.equal(first.support_x, other.support_x)


def test_digest_proves_the_same_episodes() -> None:
    x, y = pool()
    samplers = [EpisodeSampler(x, y, 3, 1, 2, seed=seed) for seed in (5, 5, 6)]
    for sampler in samplers:
        sampler.sample(4)
        sampler.sample(6)
    same, again, other = (sampler.digest() for sampler in samplers)
    assert same == again and same != other
    fewer = EpisodeSampler(x, y, 3, 1, 2, seed=5)
    fewer.sample(4)
    assert fewer.digest() != same  # a digest covers every episode drawn, not just the first ones


def test_shape_problems_name_classes_and_counts() -> None:
    y = torch.tensor([0] * 5 + [1] * 2 + [2] * 9)
    problems = episode_shape_problems(y, ways=4, shots=2, queries=2, class_names=["cat", "dog", "emu"])
    assert any("ways=4 but only 3 classes" in problem for problem in problems)
    assert any("dog: 2" in problem and "cat" not in problem for problem in problems)
    with pytest.raises(ValueError, match=r"fewer than shots\+queries=4 examples \(1: 2\)"):
        EpisodeSampler(torch.zeros(len(y), 1), y, 2, 2, 2, seed=0)
    assert episode_shape_problems(y, ways=2, shots=1, queries=1) == []


def test_split_per_class_is_stratified_disjoint_and_complete() -> None:
    _, y = pool(classes=3, per_class=10)
    rest, held = split_per_class(y, 0.2, seed=0)
    assert set(rest.tolist()).isdisjoint(held.tolist())
    assert sorted(rest.tolist() + held.tolist()) == list(range(30))
    assert torch.bincount(y[held]).tolist() == [2, 2, 2]
    assert torch.equal(split_per_class(y, 0.2, seed=0)[1], held)


def test_mean_ci95_matches_hand_computation() -> None:
    accuracies = torch.tensor([0.2, 0.4, 0.6, 1.0])
    mean, ci = mean_ci95(accuracies)
    sample_std = math.sqrt(sum((a - 0.55) ** 2 for a in [0.2, 0.4, 0.6, 1.0]) / 3)
    assert mean == pytest.approx(0.55)
    assert ci == pytest.approx(stats.norm.ppf(0.975) * sample_std / 2)


def test_training_episodes_use_train_ways_and_validation_the_evaluation_ways(tmp_path: Path) -> None:
    """train.ways widens meta-training episodes only: model selection scores episodes shaped like the test."""
    spec = load_spec(DEMO, ["train.ways=8", "train.val_episodes=4"])
    prepared = prepare(spec.data, spec.source, spec.target, cache=tmp_path)
    setup = LearnerSetup.from_spec(spec, spec.algorithms[0], prepared)
    sampler, validation = source_episodes(
        setup, prepared.source_train, prepared.source_val, spec.train_shots, 3, spec.train, seed=0
    )
    assert sampler.sample(2).ways == 8
    assert validation.ways == spec.episodes.ways == 5 and validation.num_tasks == 4
    assert setup.build().ways == 5


def test_train_cache_key_follows_train_ways(tmp_path: Path) -> None:
    """Cached training is reused for the same setup only: another train.ways trains again, while
    stating the default (episodes.ways, 5) changes nothing."""
    keys = []
    for ways in (None, 5, 8, 8):
        spec = load_spec(DEMO, [f"train.ways={ways}"] if ways else [])
        prepared = prepare(spec.data, spec.source, spec.target, cache=tmp_path)
        setup = LearnerSetup.from_spec(spec, spec.algorithms[0], prepared)
        keys.append(StableInputs().compute_key(None, {"setup": setup, "train": spec.train}, {}))
    assert keys[0] == keys[1] != keys[2] == keys[3]
