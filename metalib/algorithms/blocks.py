"""Building blocks shared by several learners: episodic training, global-label rows, cosine heads."""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from metalib.algorithms.base import Algorithm, BatchPredictor, Predictor, one_episode
from metalib.algorithms.prototypes import accuracy
from metalib.backbones import normalisation
from metalib.episodes import EpisodeBatch


def embed_episodes(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of T episodes [T, S, ...] -> [T, S, D], each episode's rows normalised on their own, as T
    separate passes would: in one pass unless the encoder has BatchNorm, whose statistics must not
    mix episodes."""
    if normalisation(encoder) != "none":
        return torch.stack([encoder(episode) for episode in x])
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
        return one_episode(self.adapt_batch, support_x, support_y)

    def adapt_batch(self, support_x: torch.Tensor, support_y: torch.Tensor) -> BatchPredictor:
        """Scores a chunk of episodes in one pass (`logits` normalises each episode on its own)."""
        self.eval()

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.logits(support_x, support_y, query_x, self.ways)

        return predict


def labelled_rows(batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Every support and query example of the batch as one flat set, with its global class id."""
    support_y, query_y = batch.global_labels()
    x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
    return x, torch.cat([support_y.flatten(), query_y.flatten()])


class StackedLinear(nn.Module):
    """One linear layer per episode, [T, S, D] -> [T, S, N]; each starts as a fresh `nn.Linear` would,
    drawn in episode order, so a chunk starts where episode-by-episode adaptation would.

    The product is taken as weight @ x^T ([T, N, S]) and returned transposed: its weight gradient is
    then grad^T @ x, which CPU batched matmul runs several times faster than the x^T @ grad that
    x @ weight^T leads to for small heads (docs/benchmarks.md, fine-tuning's head fitting)."""

    def __init__(self, tasks: int, in_features: int, out_features: int) -> None:
        super().__init__()
        layers = [nn.Linear(in_features, out_features) for _ in range(tasks)]
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(2), self.weight, x.transpose(1, 2)).transpose(1, 2)


class CosineClassifier(nn.Module):
    """Logits are scaled cosines to one weight vector per class (Chen et al. 2019, Baseline++).

    Normalising both sides makes the head compare directions only, so classes cannot win by
    weight norm, which reduces intra-class variation of the learned embedding. With `tasks`, it
    holds one head per episode ([T, S, D] -> [T, S, N]), each drawn as a fresh one-episode head.
    """

    def __init__(self, in_features: int, classes: int, scale: float, tasks: int | None = None) -> None:
        super().__init__()
        weights = [nn.Linear(in_features, classes, bias=False).weight.detach() for _ in range(tasks or 1)]
        self.weight = nn.Parameter(weights[0] if tasks is None else torch.stack(weights))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # weight @ x^T, transposed, for the faster weight gradient (as StackedLinear)
        cosines = F.normalize(self.weight, dim=-1) @ F.normalize(x, dim=-1).transpose(-1, -2)
        return self.scale * cosines.transpose(-1, -2)


def fit_heads(
    heads: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
) -> None:
    """Full-batch Adam on new per-episode heads over fixed features [T, S, D] with labels [T, S].

    The loss is the sum over episodes of each one's mean cross-entropy, so every head gets the
    gradient it would get alone, and Adam, elementwise, moves it as it would alone. Grad is enabled
    as evaluation may disable it. The heads' logits are scored with the class dimension second
    ([T, N, S], a view for the heads above), where log-softmax over a handful of classes runs
    several times faster than over the last dimension; `foreach` Adam moves the weights exactly as
    the default one does, with fewer kernel launches.
    """
    optimizer = torch.optim.Adam(heads.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            logits = heads(features).transpose(1, 2)
            F.cross_entropy(logits, labels, reduction="none").mean(1).sum().backward()
            optimizer.step()
