"""ANIL (Raghu et al., 2020): MAML whose inner loop adapts the head only.

The encoder is the same for every inner step, so support features are computed once per
task and the inner loop differentiates through a linear layer only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalib import functional
from metalib.algorithms.base import REGISTRY
from metalib.algorithms.maml import MAML
from metalib.functional import Params


@REGISTRY.register("anil")
class ANIL(MAML):
    def inner_loop(
        self,
        params: Params,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        *,
        steps: int,
        first_order: bool,
    ) -> Params:
        """Adapts `head.*` on fixed support features; the encoder's parameters pass through unchanged."""
        encoder = {
            name.removeprefix("encoder."): p for name, p in params.items() if name.startswith("encoder.")
        }
        head = {name.removeprefix("head."): p for name, p in params.items() if name.startswith("head.")}
        features = functional_call(self.net.encoder, encoder, (support_x,))

        def support_loss(fast: Params) -> torch.Tensor:
            return F.cross_entropy(functional_call(self.net.head, fast, (features,)), support_y)

        fast = functional.sgd_steps(
            support_loss, head, steps=steps, lrs=self.inner_lrs(list(head)), first_order=first_order
        )
        return {**params, **{f"head.{name}": p for name, p in fast.items()}}
