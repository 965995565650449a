"""Class means of embeddings and distance logits, shared by prototype-based learners."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Mean embedding per class: [T, S, D] with labels [T, S] -> [T, ways, D]."""
    one_hot = F.one_hot(labels, ways).to(embeddings.dtype)  # [T, S, N]
    sums = one_hot.transpose(1, 2) @ embeddings  # [T, N, D]
    return sums / one_hot.sum(1).clamp_min(1).unsqueeze(-1)


def distance_logits(
    queries: torch.Tensor, prototypes: torch.Tensor, distance: str = "euclidean"
) -> torch.Tensor:
    """Logits [T, Q, N] for query embeddings [T, Q, D] against prototypes [T, N, D]."""
    if distance == "euclidean":
        return -torch.cdist(queries, prototypes).pow(2)
    if distance == "cosine":
        return 10.0 * F.normalize(queries, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)
    raise ValueError(f"unknown distance {distance!r}; use 'euclidean' or 'cosine'")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()
