"""Adapting to a chunk of episodes at once (`adapt_batch`, what evaluation and validation use) gives what
adapting episode by episode (`adapt`) gives, for every registered learner: the same logits to float
tolerance and the same per-episode accuracies. Real data, briefly meta-trained learners: Office-Caltech10
SURF features with an mlp, and USPS digits (16x16) with conv4, whose BatchNorm must not mix episodes.
Float64, so that rounding cannot flip a near tie.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from metalib import EpisodeBatch, EpisodeSampler, algorithms, backbones, meta_train
from metalib.algorithms import Algorithm
from metalib.algorithms.blocks import CosineClassifier, StackedLinear
from metalib.evaluation import episode_accuracies

DATA = Path(__file__).resolve().parents[1] / "data"
WAYS, SHOTS, QUERIES, EPISODES = 5, 2, 3, 4
# Fewer adaptation steps than the defaults keep the episode-by-episode reference fast; first-order
# meta-training keeps the one training step cheap.
FEW_STEPS: dict[str, dict[str, Any]] = {"finetune": {"adapt_steps": 10}, "baseline_pp": {"adapt_steps": 10}}
FEW_STEPS |= {name: {"inner_steps_eval": 3, "first_order": True} for name in ("maml", "anil", "metasgd")}
FEW_STEPS["reptile"] = {"inner_steps_eval": 3}
CASES = [(name, FEW_STEPS.get(name, {})) for name in algorithms.names()] + [("matchingnet", {"fce": True})]
# With conv4, one learner per batched path: one pass of an episodic learner (here episode by episode,
# as BatchNorm mixes rows), embeddings per episode (source_only, finetune), the vmapped inner loop (maml).
CONV4_CASES = [(name, FEW_STEPS.get(name, {})) for name in ("protonet", "source_only", "finetune", "maml")]


def case_id(case: tuple[str, dict[str, Any]]) -> str:
    name, options = case
    return "-".join([name, *(f"{key}={value}" for key, value in options.items())])


@functools.cache
def office_features() -> tuple[torch.Tensor, torch.Tensor]:
    """amazon + caltech SURF counts, log1p and standardised, float64."""
    folder = DATA / "office_caltech10_surf"
    table = pd.concat([pd.read_parquet(folder / f"{name}.parquet") for name in ("amazon", "caltech")])
    x = torch.log1p(torch.tensor(np.stack(table["features"].to_numpy()), dtype=torch.float64))
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-6), torch.tensor(table["label"].to_numpy())


@functools.cache
def usps_images() -> tuple[torch.Tensor, torch.Tensor]:
    """USPS digits, 1x16x16 pixels in [0, 1], float64."""
    table = pd.read_parquet(DATA / "digits" / "usps.parquet")
    pixels = torch.tensor(np.stack(table["pixels"].to_numpy()), dtype=torch.float64) / 255
    return pixels.view(-1, 1, 16, 16), torch.tensor(table["label"].to_numpy())


def trained_learner(name: str, options: dict[str, Any], backbone: str) -> tuple[Algorithm, EpisodeBatch]:
    """A learner after one meta-training step, and episodes (of other draws) to adapt to."""
    x, y = office_features() if backbone == "mlp" else usps_images()
    sizes = {"hidden": [32]} if backbone == "mlp" else {"hidden": 8}
    torch.manual_seed(0)
    net = backbones.create(backbone, ways=WAYS, input_shape=tuple(x.shape[1:]), **sizes)
    learner = algorithms.create(name, net, ways=WAYS, num_classes=10, **options).double()
    if learner.uses_unlabelled_target:
        learner.set_unlabelled_target(x[::2])
    sampler = EpisodeSampler(x, y, WAYS, SHOTS, QUERIES, seed=0)
    learner.meta_train_step(sampler.sample(2))
    return learner, EpisodeSampler(x, y, WAYS, SHOTS, QUERIES, seed=1).sample(EPISODES)


def one_by_one(learner: Algorithm, batch: EpisodeBatch) -> torch.Tensor:
    """Query logits [T, Q, ways], adapting to each episode alone."""
    return torch.stack(
        [learner.adapt(sx, sy)(qx) for sx, sy, qx in zip(batch.support_x, batch.support_y, batch.query_x)]
    )


@pytest.mark.parametrize(
    ("case", "backbone"),
    [(case, "mlp") for case in CASES] + [(case, "conv4") for case in CONV4_CASES],
    ids=[f"{case_id(case)}-mlp" for case in CASES] + [f"{case_id(case)}-conv4" for case in CONV4_CASES],
)
def test_a_chunk_of_episodes_adapts_as_each_episode_alone(
    case: tuple[str, dict[str, Any]], backbone: str
) -> None:
    learner, batch = trained_learner(*case, backbone)
    torch.manual_seed(1)  # fresh heads (finetune, baseline_pp) are drawn in the same order on both paths
    alone = one_by_one(learner, batch)
    torch.manual_seed(1)
    together = learner.adapt_batch(batch.support_x, batch.support_y)(batch.query_x)
    assert together.shape == (EPISODES, WAYS * QUERIES, WAYS)
    torch.testing.assert_close(together, alone, rtol=1e-9, atol=1e-9)
    torch.manual_seed(1)
    accuracies = episode_accuracies(learner, batch)
    assert torch.equal(accuracies, (alone.argmax(-1) == batch.query_y).float().mean(1))
    assert 0 < accuracies.mean() < 1  # informative episodes: neither all wrong nor all right


def test_validation_scores_episodes_as_adapting_to_each_alone() -> None:
    """meta_train selects the model on validation accuracies equal to episode-by-episode adaptation's."""
    learner, validation = trained_learner("finetune", FEW_STEPS["finetune"], "mlp")
    torch.manual_seed(2)
    expected = (one_by_one(learner, validation).argmax(-1) == validation.query_y).double().mean().item()
    x, y = office_features()
    torch.manual_seed(2)
    history = meta_train(
        learner,
        EpisodeSampler(x, y, WAYS, SHOTS, QUERIES, seed=3),
        steps=1,
        meta_batch=2,
        validation=validation,
        val_every=1,
        progress=False,
    )
    assert history.curves["val/acc"][0] == (0, pytest.approx(expected, abs=1e-6))


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_stacked_heads_compute_each_episodes_own_head(head: str) -> None:
    """Stacked heads (computed as weight @ x^T and transposed, for speed) give, per episode, the logits
    and weight gradients of that episode's head alone, written the plain way."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    heads = (StackedLinear(3, 16, 5) if head == "linear" else CosineClassifier(16, 5, 10.0, tasks=3)).double()
    heads(x).square().sum().backward()
    for t in range(3):
        weight = heads.weight.detach()[t].clone().requires_grad_()
        if head == "linear":
            logits = x[t] @ weight.T + heads.bias.detach()[t]
        else:
            logits = (
                10.0
                * torch.nn.functional.normalize(x[t], dim=-1)
                @ torch.nn.functional.normalize(weight, dim=-1).T
            )
        logits.square().sum().backward()
        torch.testing.assert_close(heads(x)[t], logits, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(heads.weight.grad[t], weight.grad, rtol=1e-12, atol=1e-12)
