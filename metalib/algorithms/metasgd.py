"""Meta-SGD (Li et al., 2017): MAML that also meta-learns one inner learning rate per parameter entry.

Every rate starts at `inner_lr`. The paper starts them at random values in a range, but its range for
classification could not be checked against a source: public classification reimplementations start
them at a constant or in a narrow normal around 0.01, and the [0.005, 0.1] of sine-regression ones is
not a statement about classification. A constant is kept rather than a guessed range.
"""

from __future__ import annotations

import torch
from torch import nn

from metalib.algorithms.base import REGISTRY
from metalib.algorithms.maml import MAML, InnerLoopHParams
from metalib.backbones import Classifier


@REGISTRY.register("metasgd")
class MetaSGD(MAML):
    def __init__(self, net: Classifier, *, ways: int, num_classes: int, hparams: InnerLoopHParams) -> None:
        super().__init__(net, ways=ways, num_classes=num_classes, hparams=hparams)
        self.names = [name for name, _ in net.named_parameters()]
        self.lrs = nn.ParameterList(torch.full_like(p, hparams.inner_lr) for p in net.parameters())

    def inner_lrs(self, names: list[str]) -> dict[str, float | torch.Tensor]:
        """The learned rates, trained by the outer optimizer with the network; `inner_lr` is their start."""
        learned = dict(zip(self.names, self.lrs))
        return {name: learned[name] for name in names}
