"""Few-shot learners, created by name. Each lives in one file and registers itself.

Every learner has one interface: `meta_train_step(batch)` makes one update from an
`EpisodeBatch` and returns its metrics; `adapt(support_x, support_y)` returns a
function from query inputs to logits for that one episode; `adapt_batch` does the same for a
chunk of episodes at once (by default, by looping over `adapt`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from metalib.algorithms.base import REGISTRY, Algorithm, HParams
from metalib.backbones import Classifier
from metalib.search_space import SearchSpace


def create(
    name: str, net: Classifier, *, ways: int, num_classes: int | None = None, **hparams: Any
) -> Algorithm:
    """Build learner `name` around `net`. `num_classes` is the size of the training label space."""
    cls = REGISTRY.get(name)
    return cls(net, ways=ways, num_classes=num_classes or ways, hparams=make_hparams(name, hparams))


def make_hparams(name: str, values: dict[str, Any]) -> HParams:
    """The algorithm's typed hyperparameters; an unknown key names the known ones."""
    hparams_cls = REGISTRY.get(name).HParams
    known = {field.name for field in dataclasses.fields(hparams_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"algorithm {name!r} has no hyperparameter {', '.join(unknown)}; "
            f"its hyperparameters are: {', '.join(sorted(known))}"
        )
    return hparams_cls(**values)


def search_space(name: str) -> SearchSpace:
    """Where a hyperparameter search of learner `name` looks by default."""
    return dict(REGISTRY.get(name).SEARCH_SPACE)


def names() -> list[str]:
    return REGISTRY.names()


from metalib.algorithms import (  # noqa: E402,F401
    anil,
    baseline_pp,
    cnp,
    dann,
    finetune,
    lstm_meta,
    maml,
    matchingnet,
    metasgd,
    protonet,
    reptile,
    source_only,
)

__all__ = ["Algorithm", "HParams", "create", "make_hparams", "names", "search_space"]
