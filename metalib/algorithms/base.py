"""The interface every few-shot learner implements, and the registry that holds them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from metalib.backbones import Classifier
from metalib.episodes import EpisodeBatch
from metalib.registry import Registry
from metalib.search_space import LEARNING_RATE, SearchSpace

Predictor = Callable[[torch.Tensor], torch.Tensor]  # one episode: query_x [Q, ...] -> logits [Q, ways]
BatchPredictor = Callable[[torch.Tensor], torch.Tensor]  # T episodes: query_x [T, Q, ...] -> [T, Q, ways]


@dataclass
class HParams:
    """Hyperparameters every learner has; subclasses add their own fields."""

    lr: float = 1e-3  # learning rate of the (outer) optimizer


class Algorithm(nn.Module, ABC):
    """A learner: meta-trains on episode batches, adapts to one support set (`adapt`) or to a chunk of
    episodes at once (`adapt_batch`, with the same results: each episode's computation stays its own)."""

    HParams: ClassVar[type[HParams]] = HParams
    # Where a hyperparameter search looks by default (metalib/search_space.py); defaults lie inside.
    SEARCH_SPACE: ClassVar[SearchSpace] = LEARNING_RATE
    # True for unsupervised domain adaptation: the learner is handed unlabelled target rows
    # (never the evaluation rows) through `set_unlabelled_target` before meta-training.
    uses_unlabelled_target: ClassVar[bool] = False
    # True when parameters are sized for `ways` classes (a ways-way head, one-hot inputs), so
    # meta-training episodes must have exactly `ways` classes; False when a learner meta-trains
    # on episodes of any number of classes (more than it is tested on, as Snell et al. did).
    fixed_ways: ClassVar[bool] = True
    # Support and query rows evaluation adapts to in one pass (metalib/evaluation.py). One pass per
    # episode is slow (fine-tuning fits a head per pass); one per chunk of episodes needs memory for
    # all their rows at once, as a training batch does.
    rows_per_pass: ClassVar[int] = 1024

    def __init__(self, net: Classifier, *, ways: int, num_classes: int, hparams: HParams) -> None:
        super().__init__()
        self.net = net
        self.ways = ways
        self.num_classes = num_classes
        self.hparams = hparams
        self._optimizer: torch.optim.Optimizer | None = None
        # the number of meta-training steps of the training under way (meta_train sets it), for
        # schedules defined on the fraction of training done (dann's gradient-reversal weight)
        self.training_steps = 0

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """Adam over all trainable parameters, built on first use (after subclasses add modules)."""
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return self._optimizer

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def set_unlabelled_target(self, x: torch.Tensor) -> None:
        """Receives the target domain's unlabelled training inputs (only if uses_unlabelled_target)."""
        raise NotImplementedError(f"{type(self).__name__} does not use unlabelled target data")

    @abstractmethod
    def meta_train_step(self, batch: EpisodeBatch) -> dict[str, float]:
        """One update from a batch of episodes; returns at least `loss` and `acc`."""

    @abstractmethod
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Fit to one episode's support set; returns query_x -> logits [n, ways]."""

    def adapt_batch(self, support_x: torch.Tensor, support_y: torch.Tensor) -> BatchPredictor:
        """Fit to T episodes' support sets [T, S, ...]; returns query_x [T, Q, ...] -> logits [T, Q, ways].

        This default adapts episode by episode, which is right for every learner; learners override
        it where one pass over the chunk is faster, and must give what this loop gives.
        """
        predictors = [self.adapt(x, y) for x, y in zip(support_x, support_y)]

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            return torch.stack([predict_one(x) for predict_one, x in zip(predictors, query_x)])

        return predict


def one_episode(
    adapt_batch: Callable[[torch.Tensor, torch.Tensor], BatchPredictor],
    support_x: torch.Tensor,
    support_y: torch.Tensor,
) -> Predictor:
    """`adapt` for a learner whose `adapt_batch` is its one implementation: a chunk of one episode."""
    predict = adapt_batch(support_x[None], support_y[None])
    return lambda query_x: predict(query_x[None])[0]


REGISTRY: Registry[type[Algorithm]] = Registry("algorithm")
