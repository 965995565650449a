"""Domain-adversarial training (Ganin et al., 2016) alongside supervised source training.

A discriminator learns to tell source embeddings from unlabelled target embeddings; a
gradient-reversal layer makes the encoder learn to fool it, so source and target embeddings
align while the source head keeps them discriminative. The target rows are the target
domain's unlabelled training rows, never its evaluation rows. Adaptation is source_only's:
queries go to the nearest class mean of the support embeddings, which is where aligned
embeddings pay off without any further fitting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalib.algorithms import base
from metalib.algorithms.base import REGISTRY
from metalib.algorithms.blocks import labelled_rows
from metalib.algorithms.source_only import SourceOnly
from metalib.backbones import Classifier
from metalib.episodes import EpisodeBatch
from metalib.search_space import LEARNING_RATE, FloatRange


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.weight * grad, None


def reverse_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by -weight backward."""
    return _ReverseGradient.apply(x, weight)


@REGISTRY.register("dann")
class DANN(SourceOnly):
    uses_unlabelled_target = True

    @dataclass
    class HParams(base.HParams):
        domain_weight: float = 1.0  # final weight of the reversed gradient
        # the weight ramps up as 2 / (1 + exp(-10 p)) - 1 with p = step / warmup_steps; None: p is the
        # fraction of the whole training done, as in Ganin et al. (2016)
        warmup_steps: int | None = None
        discriminator_hidden: int = 128

    SEARCH_SPACE = {**LEARNING_RATE, "domain_weight": FloatRange(0.01, 3.0, log=True)}

    def __init__(self, net: Classifier, *, ways: int, num_classes: int, hparams: HParams) -> None:
        super().__init__(net, ways=ways, num_classes=num_classes, hparams=hparams)
        hidden = hparams.discriminator_hidden
        self.discriminator = nn.Sequential(
            nn.Linear(net.embed_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        self.target_x: torch.Tensor | None = None
        self.steps_taken = 0

    def set_unlabelled_target(self, x: torch.Tensor) -> None:
        self.target_x = x

    def get_extra_state(self) -> torch.Tensor:
        """The warm-up's position, in the state dict (as a tensor, like every other entry) so that a
        training resumed from it goes on alike."""
        return torch.tensor(self.steps_taken)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.steps_taken = int(state)

    def reversal_weight(self) -> float:
        """Ganin et al.'s schedule: near zero while the discriminator is still random, then domain_weight."""
        span = self.hparams.warmup_steps or self.training_steps
        progress = min(1.0, self.steps_taken / max(1, span))
        return self.hparams.domain_weight * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)

    def meta_train_step(self, batch: EpisodeBatch) -> dict[str, float]:
        """Source cross-entropy plus the domain loss on as many random unlabelled target rows."""
        if self.target_x is None:
            raise RuntimeError("dann needs unlabelled target rows: call set_unlabelled_target(x) first")
        self.train()
        x, y = labelled_rows(batch)
        pick = torch.randint(len(self.target_x), (len(x),), device=self.target_x.device)
        target = self.target_x[pick].to(x.device)
        embeddings = self.net.encoder(torch.cat([x, target]))
        logits = self.source_head(embeddings[: len(x)])
        class_loss = F.cross_entropy(logits, y)
        is_target = torch.cat([torch.zeros(len(x)), torch.ones(len(target))]).to(x.device)
        domain_logits = self.discriminator(reverse_gradient(embeddings, self.reversal_weight())).squeeze(-1)
        domain_loss = F.binary_cross_entropy_with_logits(domain_logits, is_target)
        self.step(class_loss + domain_loss)
        self.steps_taken += 1
        return {
            "loss": class_loss.item(),
            "acc": (logits.argmax(-1) == y).float().mean().item(),
            "domain_loss": domain_loss.item(),
            "domain_acc": ((domain_logits > 0) == is_target.bool()).float().mean().item(),
        }
