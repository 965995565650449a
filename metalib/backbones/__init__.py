"""Backbones: an encoder plus a linear head, created by name.

Every backbone is a `Classifier`, so algorithms can use the whole network (MAML),
the encoder alone (Prototypical Networks) or swap the head (fine-tuning).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from metalib.backbones.base import Classifier
from metalib.backbones.batchnorm import episode_forward, normalisation
from metalib.registry import Registry

REGISTRY: Registry = Registry("backbone")


def create(name: str, *, ways: int, input_shape: tuple[int, ...] | None = None, **options: Any) -> Classifier:
    """Build backbone `name` with a `ways`-way head; options are the backbone's own.

    Given `input_shape` (one example's shape), the backbone derives its input options
    itself (`in_features` for mlp, `in_channels` for conv nets).
    """
    factory = REGISTRY.get(name)
    if input_shape is not None:
        options = {**factory.input_options(input_shape), **options}
    try:
        encoder: nn.Module = factory(**options)
    except TypeError as exc:
        raise ValueError(f"backbone {name!r}: {exc}") from None
    return Classifier(encoder, ways)


def names() -> list[str]:
    return REGISTRY.names()


from metalib.backbones import conv4, hf_encoder, mlp, text_bag  # noqa: E402,F401  (registers itself)

__all__ = ["Classifier", "create", "episode_forward", "names", "normalisation"]
