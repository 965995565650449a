"""Baseline++ (Chen et al., 2019): pre-train with a cosine classifier, fit a new cosine head per episode.

Pre-training is source_only's supervised learning on the global source classes with the
linear head swapped for a cosine one. At adaptation time the encoder is frozen and a fresh
cosine head over the episode's `ways` classes is fitted on the support embeddings, as
fine-tuning fits its linear head.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from metalib.algorithms.base import REGISTRY
from metalib.algorithms.blocks import CosineClassifier
from metalib.algorithms.finetune import FineTune
from metalib.backbones import Classifier
from metalib.search_space import FloatRange


@REGISTRY.register("baseline_pp")
class BaselinePP(FineTune):
    @dataclass
    class HParams(FineTune.HParams):
        scale: float = 10.0  # cosine similarities are multiplied by this to give logits

    SEARCH_SPACE = {**FineTune.SEARCH_SPACE, "scale": FloatRange(2.0, 30.0, log=True)}

    def __init__(self, net: Classifier, *, ways: int, num_classes: int, hparams: HParams) -> None:
        super().__init__(net, ways=ways, num_classes=num_classes, hparams=hparams)
        self.source_head = CosineClassifier(net.embed_dim, num_classes, hparams.scale)

    def new_heads(self, tasks: int) -> nn.Module:
        return CosineClassifier(self.net.embed_dim, self.ways, self.hparams.scale, tasks=tasks)
