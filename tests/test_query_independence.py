"""A query's prediction must not depend on which other queries share its episode (docs/normalisation.md).

For every registered learner on every backbone, with default settings and after two meta-training
steps on real data from data/ (so BatchNorm statistics are not trivial), replacing, permuting or
dropping the other queries must leave each query's logits unchanged. The opt-in transductive
BatchNorm must change them, so the check can fail. `hf_encoder` is left out: it has no BatchNorm (its
LayerNorms normalise each token alone), its learners' query paths are the ones checked here on mlp
and text_bag, and a pretrained transformer would multiply this module's run time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from metalib import EpisodeSampler, algorithms, backbones
from metalib.algorithms import Algorithm
from metalib.backbones.text_bag import hash_ngrams

DATA = Path(__file__).resolve().parents[1] / "data"
SHOTS, QUERIES, TRAIN_STEPS = 2, 3, 2


@dataclass(frozen=True)
class Domains:
    """Source rows to meta-train on, target rows to evaluate on, and unlabelled target rows (dann)."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    unlabelled: torch.Tensor
    ways: int


def split(
    x: torch.Tensor, y: torch.Tensor, train_x: torch.Tensor, train_y: torch.Tensor, ways: int
) -> Domains:
    """Every other target row is unlabelled (for dann), the rest are evaluated."""
    return Domains((train_x, train_y), (x[1::2], y[1::2]), x[::2], ways)


def labels(table: pd.DataFrame) -> torch.Tensor:
    return torch.tensor(table["label"].to_numpy())


@functools.cache
def office_features() -> Domains:
    """Office-Caltech10 SURF: amazon -> webcam, log1p, standardised with amazon's statistics."""
    tables = [
        pd.read_parquet(DATA / "office_caltech10_surf" / f"{name}.parquet") for name in ("amazon", "webcam")
    ]
    source, target = (torch.log1p(torch.tensor(np.stack(t["features"].to_numpy()))).double() for t in tables)
    mean, std = source.mean(0), source.std(0).clamp_min(1e-6)
    return split((target - mean) / std, labels(tables[1]), (source - mean) / std, labels(tables[0]), ways=5)


@functools.cache
def digit_images() -> Domains:
    """USPS (16x16) -> MNIST (28x28, resized to 16x16), pixels in [0, 1], one channel."""
    usps, mnist = (pd.read_parquet(DATA / "digits" / f"{name}.parquet") for name in ("usps", "mnist"))

    def images(table: pd.DataFrame, size: int) -> torch.Tensor:
        pixels = torch.tensor(np.stack(table["pixels"].to_numpy()), dtype=torch.float64) / 255
        return pixels.view(-1, 1, size, size)

    target = F.interpolate(images(mnist, 28), size=16, mode="bilinear", antialias=True)
    return split(target, labels(mnist), images(usps, 16), labels(usps), ways=5)


@functools.cache
def review_texts() -> Domains:
    """Amazon reviews, books -> kitchen, as hashed word n-grams."""
    tables = [pd.read_parquet(DATA / "amazon_mds_mini" / f"{name}.parquet") for name in ("books", "kitchen")]
    source, target = (hash_ngrams(t["text"], max_tokens=64) for t in tables)
    return split(target, labels(tables[1]), source, labels(tables[0]), ways=2)


def setup(backbone: str) -> tuple[Domains, dict]:
    """Real data for the backbone's input kind, and small backbone options (speed only)."""
    if backbone == "mlp":
        return office_features(), {"hidden": [32]}
    if backbone == "conv4":
        return digit_images(), {"hidden": 8}
    return review_texts(), {"buckets": 2**12, "dim": 16, "hidden": 16}


def build_learner(name: str, backbone: str, **backbone_options: object) -> tuple[Algorithm, Domains]:
    """Learner `name` with default hyperparameters on `backbone`, in float64, untrained."""
    domains, options = setup(backbone)
    train_x, train_y = domains.train
    torch.manual_seed(0)
    net = backbones.create(
        backbone, ways=domains.ways, input_shape=tuple(train_x.shape[1:]), **options, **backbone_options
    )
    learner = algorithms.create(name, net, ways=domains.ways, num_classes=int(train_y.max()) + 1)
    return learner.double(), domains


@functools.cache
def trained_learner(name: str, backbone: str) -> tuple[Algorithm, Domains]:
    """The learner with default settings after a few meta-training steps (adapting does not change it)."""
    learner, domains = build_learner(name, backbone)
    if learner.uses_unlabelled_target:
        learner.set_unlabelled_target(domains.unlabelled)
    sampler = EpisodeSampler(*domains.train, domains.ways, SHOTS, QUERIES, seed=0)
    for _ in range(TRAIN_STEPS):
        learner.meta_train_step(sampler.sample(2))
    return learner, domains


def query_changes(learner: Algorithm, domains: Domains) -> dict[str, float]:
    """Largest change of a query's logits when the other queries of its episode are replaced by
    other target rows, permuted, or dropped (the query predicted alone)."""
    episodes = EpisodeSampler(*domains.test, domains.ways, SHOTS, QUERIES, seed=1).sample(2)
    support_x, support_y, query_x = episodes.support_x[0], episodes.support_y[0], episodes.query_x[0]
    predict = learner.adapt(support_x, support_y)
    logits = predict(query_x)
    keep = len(query_x) // 2
    replaced = predict(torch.cat([query_x[:keep], episodes.query_x[1][keep:]]))[:keep]
    order = torch.randperm(len(query_x), generator=torch.Generator().manual_seed(0))
    return {
        "replaced": (replaced - logits[:keep]).abs().max().item(),
        "permuted": (predict(query_x[order]) - logits[order]).abs().max().item(),
        "alone": (predict(query_x[:1]) - logits[:1]).abs().max().item(),
    }


@pytest.mark.parametrize("backbone", ["mlp", "text_bag", "conv4"])
@pytest.mark.parametrize("name", algorithms.names())
def test_a_query_prediction_ignores_the_other_queries(name: str, backbone: str) -> None:
    learner, domains = trained_learner(name, backbone)
    assert backbones.normalisation(learner.net) == ("support" if backbone == "conv4" else "none")
    changes = query_changes(learner, domains)
    assert max(changes.values()) < 1e-6, changes


@pytest.mark.parametrize("name", algorithms.names())
def test_transductive_batchnorm_is_an_opt_in_that_uses_the_other_queries(name: str) -> None:
    """The same trained weights, normalised transductively."""
    learner, domains = build_learner(name, "conv4", normalisation="transductive")
    learner.load_state_dict(trained_learner(name, "conv4")[0].state_dict())
    assert backbones.normalisation(learner.net) == "transductive"
    changes = query_changes(learner, domains)
    assert changes["replaced"] > 1e-3 and changes["alone"] > 1e-3, changes  # a permutation keeps the batch
