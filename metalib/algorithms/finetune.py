"""Fine-tuning baseline: the source-only pre-training, then a new head fitted on the support set."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metalib.algorithms import base
from metalib.algorithms.base import REGISTRY, BatchPredictor
from metalib.algorithms.blocks import StackedLinear, embed_episodes, fit_heads
from metalib.algorithms.source_only import SourceOnly
from metalib.backbones import episode_forward
from metalib.search_space import LEARNING_RATE, FloatRange, IntRange


@REGISTRY.register("finetune")
class FineTune(SourceOnly):
    @dataclass
    class HParams(base.HParams):
        adapt_steps: int = 100  # full-batch optimizer steps on the support set
        adapt_lr: float = 0.01
        adapt_weight_decay: float = 0.001

    # A head fit costs mostly per step, not per episode, so a pass takes twice the default rows (the
    # demo's 100-episode chunks of 5-way 1-shot 3-query episodes in one pass, not two); its memory is
    # that of embedding those rows without gradients.
    rows_per_pass = 2048

    SEARCH_SPACE = {
        **LEARNING_RATE,
        "adapt_lr": FloatRange(1e-3, 1e-1, log=True),
        "adapt_steps": IntRange(10, 300, log=True),
        "adapt_weight_decay": FloatRange(1e-5, 1e-1, log=True),
    }

    def new_heads(self, tasks: int) -> nn.Module:
        """Fresh heads, one per episode: [T, S, embed_dim] -> [T, S, ways]."""
        return StackedLinear(tasks, self.net.embed_dim, self.ways)

    def adapt_batch(self, support_x: torch.Tensor, support_y: torch.Tensor) -> BatchPredictor:
        """Fits a fresh head per episode on frozen support embeddings, all episodes in one optimisation;
        the encoder is not changed."""
        self.eval()
        with torch.no_grad():
            features = embed_episodes(self.net.encoder, support_x)
        heads = self.new_heads(len(support_x)).to(features)
        hparams = self.hparams
        fit_heads(
            heads,
            features,
            support_y,
            steps=hparams.adapt_steps,
            lr=hparams.adapt_lr,
            weight_decay=hparams.adapt_weight_decay,
        )

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return heads(episode_forward(self.net.encoder, support_x, query_x)[1])

        return predict
