"""A trainable text encoder that needs no download: a bag of hashed word n-grams (fastText-style).

Texts are turned into n-gram ids once (`hash_ngrams`); the encoder averages one learned vector per
hashed id. Hashing needs no vocabulary, so nothing is fitted on any domain, target domains included,
and any n-gram, seen or not, has an embedding row.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metalib.backbones import REGISTRY

WORD = re.compile(r"\w+")
ID_SPACE = 2**31 - 1  # ids are 1..ID_SPACE-1; 0 pads
MIX = 1_000_003  # combines the hashes of consecutive words into an n-gram hash


def hash_ngrams(texts: Iterable[str], ngrams: int = 2, max_tokens: int = 256) -> torch.Tensor:
    """Lower-cased word 1..`ngrams`-grams of each text as stable ids, [texts, max_tokens] int32, 0-padded.

    Ids are the same in every process (crc32, not Python's salted `hash`); the first
    `max_tokens` n-grams of each text are kept, in order of appearance.
    """
    cache: dict[str, int] = {}
    rows = []
    for text in texts:
        words = WORD.findall(text.lower())
        hashes = np.fromiter(
            (cache[w] if w in cache else cache.setdefault(w, zlib.crc32(w.encode())) for w in words),
            dtype=np.int64,
            count=len(words),
        )
        grams = [hashes]
        for n in range(2, ngrams + 1):
            previous = grams[-1]
            grams.append((previous[:-1] * MIX + hashes[n - 1 :]) % ID_SPACE)
        ids = np.concatenate(grams)[:max_tokens] % (ID_SPACE - 1) + 1
        rows.append(ids)
    out = np.zeros((len(rows), max_tokens), dtype=np.int32)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = ids
    return torch.from_numpy(out)


@REGISTRY.register("text_bag")
class TextBag(nn.Module):
    """Sum of learned n-gram embeddings over sqrt(n-gram count) (padding ignored), then one ReLU layer.

    Dividing by the square root, not the count, keeps the pooled vector's norm about the same
    for short and long texts of random ids, so gradient steps on the head (MAML's inner loop)
    are not tiny for long reviews.

    `buckets` rows are shared by all ids (id mod buckets), so the table size is chosen
    here and not by the tokenizer.
    """

    def __init__(self, buckets: int = 2**15, dim: int = 64, hidden: int = 64) -> None:
        super().__init__()
        self.buckets = buckets
        self.embedding = nn.Embedding(buckets + 1, dim, padding_idx=0)
        with torch.no_grad():
            self.embedding.weight.normal_(std=dim**-0.5)[0].zero_()
        self.layer = nn.Linear(dim, hidden)
        self.out_features = hidden

    @staticmethod
    def input_options(input_shape: tuple[int, ...]) -> dict[str, int]:
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        present = x > 0
        rows = torch.where(present, x.long() % self.buckets + 1, 0)
        summed = F.embedding(rows, self.embedding.weight, padding_idx=0).sum(1)
        pooled = summed / present.sum(1, keepdim=True).clamp_min(1).to(summed.dtype).sqrt()
        return F.relu(self.layer(pooled))
