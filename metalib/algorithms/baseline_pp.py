"""Baseline++ (Chen et al., 2019): pre-train with a cosine classifier, fit a new cosine head per episode.

Pre-training is source_only's supervised learning on the global source classes with the
linear head swapped for a cosine one. At adaptation time the encoder is frozen and a fresh
cosine head over the episode's `ways` classes is fitted on the support embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metalib.algorithms.base import REGISTRY, Predictor
from metalib.algorithms.blocks import CosineClassifier, fit_head
from metalib.algorithms.finetune import FineTune
from metalib.algorithms.source_only import SourceOnly
from metalib.backbones import Classifier


@REGISTRY.register("baseline_pp")
class BaselinePP(SourceOnly):
    @dataclass
    class HParams(FineTune.HParams):
        scale: float = 10.0  # cosine similarities are multiplied by this to give logits

    def __init__(self, net: Classifier, *, ways: int, num_classes: int, hparams: HParams) -> None:
        super().__init__(net, ways=ways, num_classes=num_classes, hparams=hparams)
        self.source_head = CosineClassifier(net.embed_dim, num_classes, hparams.scale)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        self.eval()
        with torch.no_grad():
            features = self.net.encoder(support_x)
        head = CosineClassifier(self.net.embed_dim, self.ways, self.hparams.scale).to(features.device)
        fit_head(
            head,
            features,
            support_y,
            steps=self.hparams.adapt_steps,
            lr=self.hparams.adapt_lr,
            weight_decay=self.hparams.adapt_weight_decay,
        )

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return head(self.net.encoder(query_x))

        return predict
