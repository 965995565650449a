"""Source-only baseline: a plain classifier over the source classes, no target training.

At adaptation time the pre-trained encoder embeds the target support set and queries
go to the nearest class mean, so the only target information is the support labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalib.algorithms.base import REGISTRY, Algorithm, BatchPredictor, HParams, Predictor, one_episode
from metalib.algorithms.blocks import embed_episodes, labelled_rows
from metalib.algorithms.prototypes import class_means, distance_logits
from metalib.backbones import Classifier, episode_forward
from metalib.episodes import EpisodeBatch


@REGISTRY.register("source_only")
class SourceOnly(Algorithm):
    fixed_ways = False  # trains on global labels; every episode's classes count alike

    def __init__(self, net: Classifier, *, ways: int, num_classes: int, hparams: HParams) -> None:
        super().__init__(net, ways=ways, num_classes=num_classes, hparams=hparams)
        self.source_head = nn.Linear(net.embed_dim, num_classes)

    def meta_train_step(self, batch: EpisodeBatch) -> dict[str, float]:
        """Supervised learning on every example of the batch, with global source labels."""
        self.train()
        x, y = labelled_rows(batch)
        logits = self.source_head(self.net.encoder(x))
        loss = F.cross_entropy(logits, y)
        self.step(loss)
        return {"loss": loss.item(), "acc": (logits.argmax(-1) == y).float().mean().item()}

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        return one_episode(self.adapt_batch, support_x, support_y)

    @torch.no_grad()
    def adapt_batch(self, support_x: torch.Tensor, support_y: torch.Tensor) -> BatchPredictor:
        """Class means of each episode's support embeddings; queries scored by distance to them."""
        self.eval()
        prototypes = class_means(embed_episodes(self.net.encoder, support_x), support_y, self.ways)

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return distance_logits(episode_forward(self.net.encoder, support_x, query_x)[1], prototypes)

        return predict
