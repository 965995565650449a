"""The shape every backbone shares: encoder -> embedding -> linear head."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """An encoder with `out_features` and a linear head over `ways` classes."""

    def __init__(self, encoder: nn.Module, ways: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.embed_dim: int = encoder.out_features
        self.head = nn.Linear(self.embed_dim, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))
