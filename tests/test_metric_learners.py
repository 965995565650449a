"""Metric- and model-based learners and the baselines: mechanics on toy episodes, learning on real data."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import metalib
from metalib import algorithms, backbones
from metalib.algorithms import Algorithm, lstm_meta
from metalib.algorithms.dann import reverse_gradient

WAYS = 5
TOY_FEATURES = 12

CASES = [
    ("protonet", {}),
    ("matchingnet", {}),
    ("matchingnet", {"fce": True}),
    ("cnp", {}),
    ("cnp", {"aggregate": "mean"}),
    ("lstm_meta", {}),
    ("baseline_pp", {}),
    ("dann", {}),
]
ORDER_FREE = [case for case in CASES if case[0] in ("protonet", "cnp") or case == ("matchingnet", {})]
# Learners that classify with their own head (or none) leave the backbone's linear head unused.
OWN_HEAD = {"protonet", "matchingnet", "cnp", "baseline_pp", "dann"}


def case_id(case: tuple[str, dict[str, Any]]) -> str:
    name, hparams = case
    return "-".join([name, *(f"{key}={value}" for key, value in hparams.items())])


def toy_learner(name: str, hparams: dict[str, Any], num_classes: int = 8) -> Algorithm:
    torch.manual_seed(0)
    net = backbones.create("mlp", in_features=TOY_FEATURES, hidden=[16, 8], ways=WAYS)
    learner = algorithms.create(name, net, ways=WAYS, num_classes=num_classes, **hparams)
    if learner.uses_unlabelled_target:
        learner.set_unlabelled_target(torch.randn(40, TOY_FEATURES) + 1.0)
    return learner


def toy_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight classes with separated means, so episodes have signal to learn from."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(160) % 8
    x = torch.randn(8, TOY_FEATURES, generator=generator)[y] + 0.5 * torch.randn(160, TOY_FEATURES)
    return x, y


def toy_episodes(num_tasks: int = 3, seed: int = 0, ways: int = WAYS) -> metalib.EpisodeBatch:
    return metalib.EpisodeSampler(*toy_data(seed), ways, shots=2, queries=3, seed=seed).sample(num_tasks)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_step_metrics_and_prediction_shapes(case: tuple[str, dict[str, Any]]) -> None:
    learner = toy_learner(*case)
    batch = toy_episodes()
    metrics = learner.meta_train_step(batch)
    assert np.isfinite(metrics["loss"]) and 0.0 <= metrics["acc"] <= 1.0
    predict = learner.adapt(batch.support_x[0], batch.support_y[0])
    for queries in (batch.query_x[0], batch.query_x[0, :7]):
        logits = predict(queries)
        assert logits.shape == (len(queries), WAYS) and torch.isfinite(logits).all()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_adapting_leaves_the_learner_unchanged(case: tuple[str, dict[str, Any]]) -> None:
    learner = toy_learner(*case)
    batch = toy_episodes()
    before = {key: value.clone() for key, value in learner.state_dict().items()}
    learner.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0])
    after = learner.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize("case", ORDER_FREE, ids=case_id)
def test_prediction_ignores_support_order(case: tuple[str, dict[str, Any]]) -> None:
    learner = toy_learner(*case)
    learner.meta_train_step(toy_episodes(seed=1))
    batch = toy_episodes()
    order = torch.randperm(batch.support_x.shape[1], generator=torch.Generator().manual_seed(3))
    logits = learner.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0])
    shuffled = learner.adapt(batch.support_x[0, order], batch.support_y[0, order])(batch.query_x[0])
    torch.testing.assert_close(shuffled, logits, rtol=1e-5, atol=1e-5)


def test_full_context_embeddings_read_the_support_in_order() -> None:
    """The BiLSTM over the support is order-dependent, as in the paper, so the check above can fail."""
    learner = toy_learner("matchingnet", {"fce": True})
    batch = toy_episodes()
    order = torch.arange(batch.support_x.shape[1]).flip(0)
    logits = learner.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0])
    shuffled = learner.adapt(batch.support_x[0, order], batch.support_y[0, order])(batch.query_x[0])
    assert not torch.allclose(shuffled, logits, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_one_step_reaches_every_trainable_parameter(case: tuple[str, dict[str, Any]]) -> None:
    learner = toy_learner(*case)
    learner.meta_train_step(toy_episodes())
    unused = {"net.head.weight", "net.head.bias"} if case[0] in OWN_HEAD else set()
    missing = [
        name
        for name, parameter in learner.named_parameters()
        if name not in unused and (parameter.grad is None or not parameter.grad.abs().sum() > 0)
    ]
    assert not missing, f"no gradient reached {missing}"


EVERY_LEARNER = [(name, {}) for name in algorithms.REGISTRY.names()] + [("matchingnet", {"fce": True})]


@pytest.mark.parametrize("case", EVERY_LEARNER, ids=case_id)
def test_fixed_ways_says_which_learners_can_meta_train_on_more_classes(
    case: tuple[str, dict[str, Any]],
) -> None:
    """Learners without fixed ways train on 8-way episodes and still answer 5-way ones (train.ways);
    the others really cannot, so the spec is right to refuse train.ways for them."""
    name, hparams = case
    learner = toy_learner(name, hparams)
    wide = toy_episodes(ways=8)
    if algorithms.REGISTRY.get(name).fixed_ways:
        with pytest.raises((RuntimeError, IndexError)):
            learner.meta_train_step(wide)
        return
    metrics = learner.meta_train_step(wide)
    assert np.isfinite(metrics["loss"])
    batch = toy_episodes()
    assert learner.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0]).shape == (15, WAYS)


def test_dann_without_unlabelled_target_rows_says_so() -> None:
    net = backbones.create("mlp", in_features=TOY_FEATURES, hidden=[16, 8], ways=WAYS)
    learner = algorithms.create("dann", net, ways=WAYS, num_classes=8)
    with pytest.raises(RuntimeError, match="set_unlabelled_target"):
        learner.meta_train_step(toy_episodes())


def test_dann_weight_follows_ganin_et_al_over_the_whole_training() -> None:
    """lambda_p = 2 / (1 + exp(-10 p)) - 1 with p the training progress from 0 to 1 (Ganin et al. 2016),
    scaled by domain_weight; warmup_steps, when set, replaces the whole training as the span."""
    learner = toy_learner("dann", {"domain_weight": 0.5})
    sampler = metalib.EpisodeSampler(*toy_data(), WAYS, shots=2, queries=3, seed=0)
    weights = []
    original = learner.meta_train_step

    def recording(batch: metalib.EpisodeBatch) -> dict[str, float]:
        weights.append(learner.reversal_weight())
        return original(batch)

    learner.meta_train_step = recording  # type: ignore[method-assign]
    metalib.meta_train(
        learner, sampler, steps=8, meta_batch=1, validation=toy_episodes(), val_every=8, progress=False
    )
    published = [0.5 * (2 / (1 + np.exp(-10 * step / 8)) - 1) for step in range(8)]
    np.testing.assert_allclose(weights, published)
    fixed = toy_learner("dann", {"warmup_steps": 4})
    fixed.training_steps, fixed.steps_taken = 100, 2
    np.testing.assert_allclose(fixed.reversal_weight(), 2 / (1 + np.exp(-5)) - 1)


def test_gradient_reversal_flips_and_scales_the_gradient() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    weights = torch.randn(4, 3)
    (reverse_gradient(x, 0.5) * weights).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * weights)


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_lstm_meta_inner_loop_lowers_the_support_loss(adapt: str) -> None:
    learner = toy_learner("lstm_meta", {"adapt": adapt})
    batch = toy_episodes()
    module, support, _ = learner.learner(batch.support_x, batch.query_x)
    initial = lstm_meta.flatten(lstm_meta.trainable(module)).expand(3, -1)
    with torch.no_grad():
        adapted = learner.unroll(module, support, batch.support_y)
    losses = [
        lstm_meta.learner_gradients(module, params, support, batch.support_y)[1].mean()
        for params in (initial, adapted)
    ]
    assert losses[1] < losses[0] - 0.01


def test_baseline_pp_pretrains_a_cosine_head() -> None:
    """Cosine logits are bounded by the scale whatever the embedding norm."""
    learner = toy_learner("baseline_pp", {"scale": 3.0})
    logits = learner.source_head(1000.0 * torch.rand(6, learner.net.embed_dim))
    assert logits.shape == (6, 8) and logits.abs().max() <= 3.0 + 1e-5


# Learning on real data: Office-Caltech10 SURF, source amazon+caltech, target webcam.

DATA = Path(__file__).resolve().parents[1] / "data" / "office_caltech10_surf"
SHOTS, QUERIES = 5, 5
STEPS, META_BATCH, EVAL_EPISODES = 150, 4, 80
CHANCE = 1 / WAYS


@dataclass(frozen=True)
class CrossDomain:
    source_train: tuple[torch.Tensor, torch.Tensor]
    source_val: tuple[torch.Tensor, torch.Tensor]
    target_unlabelled: torch.Tensor  # kept apart from the evaluation rows, for dann
    target_eval: tuple[torch.Tensor, torch.Tensor]


def read_domain(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = pd.read_parquet(DATA / f"{name}.parquet")
    counts = torch.as_tensor(np.stack(table["features"].to_numpy()), dtype=torch.float32)
    return torch.log1p(counts), torch.tensor(table["label"].to_numpy())


@functools.cache
def amazon_caltech_to_webcam() -> CrossDomain:
    """log1p features standardised with source-training statistics; 30% of webcam held out unlabelled."""
    parts = [read_domain(name) for name in ("amazon", "caltech")]
    source_x, source_y = torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
    train, val = metalib.split_per_class(source_y, 0.2, seed=0)
    mean, std = source_x[train].mean(0), source_x[train].std(0).clamp_min(1e-6)
    target_x, target_y = read_domain("webcam")
    target_x = (target_x - mean) / std
    labelled, unlabelled = metalib.split_per_class(target_y, 0.3, seed=0)
    source_x = (source_x - mean) / std
    return CrossDomain(
        source_train=(source_x[train], source_y[train]),
        source_val=(source_x[val], source_y[val]),
        target_unlabelled=target_x[unlabelled],
        target_eval=(target_x[labelled], target_y[labelled]),
    )


def target_accuracies_before_and_after_training(
    name: str, hparams: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-episode target accuracies of one learner untrained and after a short meta-training run.

    Both evaluations draw the same target episodes (fixed seed), so accuracies pair up by episode.
    """
    data = amazon_caltech_to_webcam()
    torch.manual_seed(0)
    net = backbones.create("mlp", in_features=800, hidden=[256, 128], ways=WAYS)
    learner = algorithms.create(name, net, ways=WAYS, num_classes=10, **hparams)
    if learner.uses_unlabelled_target:
        learner.set_unlabelled_target(data.target_unlabelled)

    def target_accuracies() -> torch.Tensor:
        sampler = metalib.EpisodeSampler(*data.target_eval, WAYS, SHOTS, QUERIES, seed=1)
        return metalib.evaluate(learner, sampler, EVAL_EPISODES)

    untrained = target_accuracies()
    metalib.meta_train(
        learner,
        metalib.EpisodeSampler(*data.source_train, WAYS, SHOTS, QUERIES, seed=2),
        steps=STEPS,
        meta_batch=META_BATCH,
        validation=metalib.EpisodeSampler(*data.source_val, WAYS, SHOTS, QUERIES, seed=3).sample(20),
        val_every=STEPS // 2,
        progress=False,
    )
    return untrained, target_accuracies()


@pytest.mark.parametrize(
    "case",
    [
        ("matchingnet", {"lr": 3e-3}),
        ("cnp", {"lr": 3e-3}),
        # two learner updates, not five: every one writes all 238k parameters of this mlp per episode
        ("lstm_meta", {"inner_steps": 2}),
        ("baseline_pp", {}),
        ("dann", {}),
    ],
    ids=case_id,
)
def test_meta_training_beats_chance_and_the_untrained_model_on_a_new_domain(
    case: tuple[str, dict[str, Any]],
) -> None:
    untrained, trained = target_accuracies_before_and_after_training(*case)
    accuracy, accuracy_ci = metalib.mean_ci95(trained)
    gain, gain_ci = metalib.mean_ci95(trained - untrained)
    report = f"target acc {accuracy:.3f} ± {accuracy_ci:.3f}, gain over untrained {gain:.3f} ± {gain_ci:.3f}"
    assert accuracy - accuracy_ci > CHANCE + 0.15, report
    assert gain - gain_ci > 0.03, report
