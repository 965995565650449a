"""Conv-4 (Vinyals et al. 2016; Finn et al. 2017): 4 x [conv 3x3, BatchNorm, ReLU, max-pool 2x2]."""

from __future__ import annotations

import torch
from torch import nn

from metalib.backbones import REGISTRY
from metalib.backbones.batchnorm import BatchNorm


@REGISTRY.register("conv4")
class Conv4(nn.Module):
    """Four conv blocks, then a spatial mean, so `out_features` = `hidden` for any image size.

    On 28x28 inputs (Omniglot) the last feature map is 1x1 and the mean is the usual flatten.
    `normalisation` says whose statistics BatchNorm uses for an episode's queries: "support"
    (the episode's support set) or "transductive" (the queries' own); see metalib.backbones.batchnorm.
    """

    def __init__(self, in_channels: int, hidden: int = 64, normalisation: str = "support") -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1),
                    BatchNorm(hidden, normalisation),
                    nn.ReLU(),
                    nn.MaxPool2d(2),
                )
                for i in range(4)
            )
        )
        self.out_features = hidden

    @staticmethod
    def input_options(input_shape: tuple[int, ...]) -> dict[str, int]:
        if min(input_shape[1:]) < 16:
            raise ValueError(
                f"conv4 halves its input four times, so images must be at least 16x16, not "
                f"{'x'.join(map(str, input_shape[1:]))}; raise data.image_size"
            )
        return {"in_channels": input_shape[0]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean((2, 3))
