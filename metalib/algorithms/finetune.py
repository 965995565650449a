"""Fine-tuning baseline: the source-only pre-training, then a new head fitted on the support set."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metalib.algorithms import base
from metalib.algorithms.base import REGISTRY, Predictor
from metalib.algorithms.blocks import fit_head
from metalib.algorithms.source_only import SourceOnly


@REGISTRY.register("finetune")
class FineTune(SourceOnly):
    @dataclass
    class HParams(base.HParams):
        adapt_steps: int = 100  # full-batch optimizer steps on the support set
        adapt_lr: float = 0.01
        adapt_weight_decay: float = 0.001

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Fits a fresh linear head on frozen support embeddings; the encoder is not changed."""
        self.eval()
        with torch.no_grad():
            features = self.net.encoder(support_x)
        head = nn.Linear(self.net.embed_dim, self.ways).to(features.device)
        hparams = self.hparams
        fit_head(
            head,
            features,
            support_y,
            steps=hparams.adapt_steps,
            lr=hparams.adapt_lr,
            weight_decay=hparams.adapt_weight_decay,
        )

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return head(self.net.encoder(query_x))

        return predict
