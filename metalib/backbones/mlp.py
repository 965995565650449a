"""A multi-layer perceptron for feature-vector inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from metalib.backbones import REGISTRY


@REGISTRY.register("mlp")
class MLP(nn.Module):
    """Linear -> ReLU layers (with optional dropout); `out_features` is the last hidden size."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (256, 128), dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    @staticmethod
    def input_options(input_shape: tuple[int, ...]) -> dict[str, int]:
        return {"in_features": math.prod(input_shape)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))
