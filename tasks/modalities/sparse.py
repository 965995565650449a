"""Sparse feature vectors: lists of {index, count} pairs, densified into the vectors the dense path makes.

A storage format of the features modality, not a modality of its own: the same tensors, standardisation
and default backbone follow.
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import torch

from adaptflow.errors import StudyError
from tasks.modalities.base import LISTS


def is_sparse(feature: Any) -> bool:
    """A list of {index, count} pairs (one feature vector stored sparsely)."""
    return (
        isinstance(feature, LISTS)
        and isinstance(feature.feature, dict)
        and set(feature.feature) == {"index", "count"}
    )


def dense(table: datasets.Dataset, column: str, num_features: int | None) -> torch.Tensor:
    """Lists of {index, count} pairs as dense float vectors [rows, num_features]; repeated indices add up."""
    if num_features is None:
        raise StudyError(
            f"column {column!r} holds sparse {{index, count}} pairs: set data.num_features to the length "
            "of the dense feature vector (indices count from 0)"
        )
    lists = table.with_format("arrow")[:][column].combine_chunks()
    pairs = lists.flatten()
    index = torch.as_tensor(pairs.field("index").to_numpy(zero_copy_only=False).astype(np.int64))
    count = torch.as_tensor(pairs.field("count").to_numpy(zero_copy_only=False).astype(np.float32))
    if len(index) and (index.min() < 0 or index.max() >= num_features):
        raise StudyError(
            f"column {column!r} has feature indices from {int(index.min())} to {int(index.max())}, outside "
            f"0..{num_features - 1}; set data.num_features to the dense length (indices count from 0)"
        )
    lengths = np.diff(lists.offsets.to_numpy())
    rows = torch.as_tensor(np.repeat(np.arange(len(lists)), lengths))
    out = torch.zeros(len(lists), num_features)
    out.index_put_((rows, index), count, accumulate=True)
    return out
