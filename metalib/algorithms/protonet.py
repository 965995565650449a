"""Prototypical Networks (Snell et al., 2017): classify queries by distance to class means."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metalib.algorithms import base
from metalib.algorithms.base import REGISTRY
from metalib.algorithms.blocks import EpisodicLearner
from metalib.algorithms.prototypes import class_means, distance_logits
from metalib.backbones import episode_forward
from metalib.search_space import LEARNING_RATE, Choice


@REGISTRY.register("protonet")
class ProtoNet(EpisodicLearner):
    @dataclass
    class HParams(base.HParams):
        distance: str = "euclidean"  # or "cosine"

        def __post_init__(self) -> None:
            if self.distance not in ("euclidean", "cosine"):
                raise ValueError(f"protonet distance must be 'euclidean' or 'cosine', not {self.distance!r}")

    SEARCH_SPACE = {**LEARNING_RATE, "distance": Choice(("euclidean", "cosine"))}

    fixed_ways = False

    def logits(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Query logits [T, Q, N]: negative distances to the support set's class means."""
        support, queries = episode_forward(self.net.encoder, support_x, query_x)
        return distance_logits(queries, class_means(support, support_y, ways), self.hparams.distance)
