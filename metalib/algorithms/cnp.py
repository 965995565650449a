"""Conditional Neural Processes (Garnelo et al., 2018) for few-shot classification.

Each support pair (embedding of x, one-hot y) is encoded to a representation; a mean
aggregates them, so the prediction does not depend on support order; a decoder maps a
query embedding and the aggregate to logits. With `aggregate="class"` there is one mean per
class and the decoder scores each (query, class representation) pair; with "mean" one mean
over the whole support set is decoded to all `ways` logits at once. "mean" must untangle the
classes from one vector and learns far more slowly (on Office-Caltech, not within 600 steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalib.algorithms import base
from metalib.algorithms.base import REGISTRY
from metalib.algorithms.blocks import EpisodicLearner
from metalib.algorithms.prototypes import class_means
from metalib.backbones import Classifier, episode_forward
from metalib.search_space import LEARNING_RATE, Choice


@REGISTRY.register("cnp")
class CNP(EpisodicLearner):
    @dataclass
    class HParams(base.HParams):
        aggregate: str = "class"  # "class": one mean per class; "mean": one mean over the support set
        hidden: int = 128  # width of the pair encoder and the decoder

    SEARCH_SPACE = {**LEARNING_RATE, "hidden": Choice((64, 128, 256))}

    def __init__(self, net: Classifier, *, ways: int, num_classes: int, hparams: HParams) -> None:
        super().__init__(net, ways=ways, num_classes=num_classes, hparams=hparams)
        if hparams.aggregate not in ("class", "mean"):
            raise ValueError(f"unknown aggregate {hparams.aggregate!r}; use 'class' or 'mean'")
        dim, hidden = net.embed_dim, hparams.hidden
        self.pair_encoder = mlp(dim + ways, hidden, hidden)
        self.decoder = mlp(dim + hidden, hidden, 1 if hparams.aggregate == "class" else ways)

    def logits(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        support, queries = episode_forward(self.net.encoder, support_x, query_x)  # [T, S, D], [T, Q, D]
        pairs = self.pair_encoder(torch.cat([support, F.one_hot(support_y, ways).to(support)], -1))
        if self.hparams.aggregate == "mean":
            context = pairs.mean(1, keepdim=True).expand(-1, queries.shape[1], -1)  # [T, Q, H]
            return self.decoder(torch.cat([queries, context], -1))
        context = class_means(pairs, support_y, ways)  # [T, N, H]
        grid = torch.cat(
            [
                queries.unsqueeze(2).expand(-1, -1, ways, -1),
                context.unsqueeze(1).expand(-1, queries.shape[1], -1, -1),
            ],
            -1,
        )  # [T, Q, N, D + H]
        return self.decoder(grid).squeeze(-1)


def mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """The two-layer perceptron used for both the pair encoder and the decoder."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))
