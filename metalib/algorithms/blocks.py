"""Building blocks shared by several learners: episodic training, global-label rows, cosine heads."""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from metalib.algorithms.base import Algorithm, Predictor
from metalib.algorithms.prototypes import accuracy
from metalib.episodes import EpisodeBatch


def embed_tasks(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Embeds [T, S, ...] inputs to [T, S, D] in one encoder pass."""
    return encoder(x.flatten(0, 1)).unflatten(0, x.shape[:2])


class EpisodicLearner(Algorithm):
    """A learner whose whole method is one differentiable map (support set, queries) -> logits.

    Meta-training minimises query cross-entropy over the batch of episodes; adapting is
    conditioning that map on one support set, so both verbs are written once here.
    """

    @abstractmethod
    def logits(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Query logits [T, Q, ways] for T episodes of `ways` classes."""

    def meta_train_step(self, batch: EpisodeBatch) -> dict[str, float]:
        self.train()
        logits = self.logits(batch.support_x, batch.support_y, batch.query_x, batch.ways)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        self.step(loss)
        return {"loss": loss.item(), "acc": accuracy(logits, batch.query_y)}

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        self.eval()

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.logits(support_x[None], support_y[None], query_x[None], self.ways)[0]

        return predict


def labelled_rows(batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Every support and query example of the batch as one flat set, with its global class id."""
    support_y, query_y = batch.global_labels()
    x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
    return x, torch.cat([support_y.flatten(), query_y.flatten()])


class CosineClassifier(nn.Module):
    """Logits are scaled cosines to one weight vector per class (Chen et al. 2019, Baseline++).

    Normalising both sides makes the head compare directions only, so classes cannot win by
    weight norm, which reduces intra-class variation of the learned embedding.
    """

    def __init__(self, in_features: int, classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(in_features, classes, bias=False).weight.detach())
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T


def fit_head(
    head: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
) -> None:
    """Full-batch Adam on a new head over fixed features; grad is enabled as evaluation may disable it."""
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(head(features), labels).backward()
            optimizer.step()
