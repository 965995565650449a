"""Text: hashed word n-grams (text_bag), or the token ids of a Hugging Face tokenizer (hf_encoder)."""

from __future__ import annotations

from typing import Any

import datasets
import torch

from adaptflow.spec import DataSpec
from metalib.backbones import hf_encoder, text_bag
from tasks.modalities.base import REGISTRY, Modality, progress


@REGISTRY.register("text")
class Text(Modality):
    uses = (text_bag, hf_encoder)

    def claims(self, feature: Any) -> bool:
        return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")

    def tensor(self, table: datasets.Dataset, column: str, data: DataSpec) -> torch.Tensor:
        """Token ids [rows, max_tokens], 0 padding; nothing is fitted, so none is standardised."""
        texts = table[:][column]
        if data.tokenizer:
            return hf_encoder.tokenize(texts, data.tokenizer, data.max_tokens)
        return text_bag.hash_ngrams(progress(texts, "tokenising", len(texts)), data.ngrams, data.max_tokens)
