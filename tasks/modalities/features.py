"""Feature vectors: numeric lists of one length (dense), or lists of {index, count} pairs (sparse.py)."""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import torch

from adaptflow.errors import StudyError
from adaptflow.spec import DataSpec
from tasks.modalities import sparse
from tasks.modalities.base import LISTS, REGISTRY, Modality, Normaliser


@REGISTRY.register("features")
class Features(Modality):
    def claims(self, feature: Any) -> bool:
        """Flat lists, and lists of {index, count} pairs. Flat pixel lists look the same (counts are
        often uint8 too): they need data.modality: image."""
        return isinstance(feature, LISTS) and not isinstance(feature.feature, LISTS)

    def tensor(self, table: datasets.Dataset, column: str, data: DataSpec) -> torch.Tensor:
        """Float vectors [rows, length]; sparse pairs are densified to data.num_features."""
        if sparse.is_sparse(table.features[column]):
            return sparse.dense(table, column, data.num_features)
        array = table.with_format("numpy")[:][column]
        if array.dtype == object or not np.issubdtype(array.dtype, np.number):
            raise StudyError(
                f"column {column!r} does not hold numeric feature vectors of one length "
                f"(feature type: {table.features[column]}); set data.input to such a column, "
                "or data.modality if it holds text or images."
            )
        return torch.as_tensor(array, dtype=torch.float32).reshape(len(array), -1)

    def normaliser(self, reference: torch.Tensor, data: DataSpec) -> Normaliser:
        """Per feature, after log(1 + x) with data.log1p (counts, histograms)."""

        def transform(x: torch.Tensor) -> torch.Tensor:
            return torch.log1p(x.clamp_min(0)) if data.log1p else x

        mean = transform(reference).mean(0)
        std = transform(reference).std(0).clamp_min(1e-6)
        return lambda x: (transform(x) - mean) / std
