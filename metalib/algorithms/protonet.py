"""Prototypical Networks (Snell et al., 2017): classify queries by distance to class means."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metalib.algorithms import base
from metalib.algorithms.base import REGISTRY, Algorithm, Predictor
from metalib.algorithms.prototypes import accuracy, class_means, distance_logits
from metalib.episodes import EpisodeBatch


@REGISTRY.register("protonet")
class ProtoNet(Algorithm):
    @dataclass
    class HParams(base.HParams):
        distance: str = "euclidean"  # or "cosine"

        def __post_init__(self) -> None:
            if self.distance not in ("euclidean", "cosine"):
                raise ValueError(f"protonet distance must be 'euclidean' or 'cosine', not {self.distance!r}")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embeds [T, S, ...] inputs to [T, S, D] in one encoder pass."""
        return self.net.encoder(x.flatten(0, 1)).unflatten(0, x.shape[:2])

    def logits(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Query logits [T, Q, N] from prototypes of the support set."""
        prototypes = class_means(self.embed(support_x), support_y, self.ways)
        return distance_logits(self.embed(query_x), prototypes, self.hparams.distance)

    def meta_train_step(self, batch: EpisodeBatch) -> dict[str, float]:
        self.train()
        logits = self.logits(batch.support_x, batch.support_y, batch.query_x)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        self.step(loss)
        return {"loss": loss.item(), "acc": accuracy(logits, batch.query_y)}

    @torch.no_grad()
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        self.eval()
        prototypes = class_means(self.embed(support_x[None]), support_y[None], self.ways)

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return distance_logits(self.embed(query_x[None]), prototypes, self.hparams.distance)[0]

        return predict
