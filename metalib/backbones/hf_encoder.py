"""A pretrained Hugging Face text encoder (e.g. a sentence-transformers model), mean-pooled.

Needs the optional extra `hf` (`transformers`). Texts are tokenised once, in prepare, with the
model's own tokenizer (`tokenize`); ids are stored shifted by one so that 0 pads, as for the
hashed n-grams of `text_bag`. `model` is a hub id or a local folder; offline
(`HF_HUB_OFFLINE=1`) a hub id must already be in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from metalib.backbones import REGISTRY


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError("the hf_encoder backbone needs transformers: pip install 'adaptflow[hf]'") from None
    return transformers


def tokenize(texts: Sequence[str], model: str, max_tokens: int = 256) -> torch.Tensor:
    """Token ids of `model`'s tokenizer plus one, [texts, max_tokens] int32, 0-padded, truncated."""
    tokenizer = _transformers().AutoTokenizer.from_pretrained(model)
    encoded = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt"
    )
    ids = (encoded["input_ids"] + 1) * encoded["attention_mask"]
    return ids.to(torch.int32)


def _drop_frozen(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    for key in [key for key in state if key.startswith(f"{prefix}model.")]:
        del state[key]


def _fill_frozen(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    if any(key.startswith(f"{prefix}model.") for key in state):  # weights other than the pretrained
        module.own_weights = {}
    for name, value in module.model.state_dict().items():
        state.setdefault(f"{prefix}model.{name}", value)


# (model, device, dtype) -> token ids of a text -> its pooled embedding under the pretrained weights
POOLED: dict[tuple[str, str, str], dict[tuple[int, ...], torch.Tensor]] = {}


@REGISTRY.register("hf_encoder")
class HFEncoder(nn.Module):
    """Mean of the last hidden states over the real tokens, then a trainable linear map.

    The transformer is frozen (and kept in eval mode) by default. The linear map starts as the
    identity, so the encoder starts as the pretrained sentence embedding, and a frozen encoder
    still has something to meta-learn. A frozen transformer with its pretrained weights gives a text
    one pooled embedding for good, so each distinct text is encoded once per process, device and dtype
    and remembered (`POOLED`, shared by every such encoder of the model: a study builds one per training
    and evaluation): episodes draw the same reviews again and again, and the transformer is nearly all
    of the cost (~30 texts/s on 2 CPU cores). Texts first met inside a torch.func transform (MAML's
    inner loop) are encoded there but not remembered. An encoder given other transformer weights
    (`load_state_dict` of a fine-tuned model) remembers for itself only.
    """

    vmappable = False  # attention has data-dependent control flow, which torch.func.vmap refuses

    def __init__(self, model: str, freeze: bool = True) -> None:
        super().__init__()
        self.model = _transformers().AutoModel.from_pretrained(model)
        self.freeze = freeze
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()
            # frozen weights are the pretrained ones, rebuilt from `model`: state dicts (trained models
            # sent to evaluation tasks, checkpoints, logged models) leave them out, 90 MB for MiniLM
            self.register_state_dict_post_hook(_drop_frozen)
            self.register_load_state_dict_pre_hook(_fill_frozen)
        self.model_name = model
        self.own_weights: dict[tuple[int, ...], torch.Tensor] | None = None  # once others are loaded
        self.out_features: int = self.model.config.hidden_size
        self.project = nn.Linear(self.out_features, self.out_features)
        with torch.no_grad():
            self.project.weight.copy_(torch.eye(self.out_features))
            self.project.bias.zero_()

    @staticmethod
    def input_options(input_shape: tuple[int, ...]) -> dict[str, Any]:
        return {}

    def train(self, mode: bool = True) -> HFEncoder:
        """A frozen encoder stays in eval mode (no dropout), so an input always has one embedding."""
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.freeze:
            return self.project(self._pool(x))
        memo = self._memo(x.device)
        keys = [tuple(row) for row in x.tolist()]  # tolist, unlike numpy(), works inside torch.func
        new = sorted({key: i for i, key in enumerate(keys) if key not in memo}.values())
        computed: dict[tuple[int, ...], torch.Tensor] = {}
        if new:
            with torch.no_grad():
                computed = dict(zip([keys[i] for i in new], self._pool(x[new]), strict=True))
            # inside a torch.func transform tensors made here are the transform's and must not outlive it
            if torch._C._functorch.maybe_current_level() is None:
                memo.update(computed)
        return self.project(torch.stack([computed[key] if key in computed else memo[key] for key in keys]))

    def _memo(self, device: torch.device) -> dict[tuple[int, ...], torch.Tensor]:
        if self.own_weights is not None:
            return self.own_weights
        return POOLED.setdefault((self.model_name, str(device), str(self.model.dtype)), {})

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        mask = x > 0
        ids = (x.long() - 1).clamp_min(0)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
