"""Reptile (Nichol et al., 2018): move the start towards the weights each task's inner loop reaches.

The inner loop is plain SGD on the support set, with no graph. The outer update
theta <- theta + epsilon * mean_t(phi_t - theta) is SGD with step `epsilon` on the
objective sum((theta - phi_t)^2) / 2, whose gradient is theta - phi_t; so Reptile reuses
MAML's task loop (or vmap) unchanged. The base `lr` is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metalib.algorithms.base import REGISTRY
from metalib.algorithms.maml import MAML, InnerLoopHParams
from metalib.functional import Params
from metalib.search_space import FloatRange, IntRange


@REGISTRY.register("reptile")
class Reptile(MAML):
    @dataclass
    class HParams(InnerLoopHParams):
        inner_lr: float = 0.1
        inner_steps: int = 5
        epsilon: float = 0.5  # outer interpolation step towards the adapted weights

    # no `lr`: the outer step is the interpolation `epsilon`
    SEARCH_SPACE = {
        "inner_lr": FloatRange(0.01, 1.0, log=True),
        "inner_steps": IntRange(1, 10),
        "epsilon": FloatRange(0.1, 1.0),
    }

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.epsilon)
        return self._optimizer

    def task_objective(
        self,
        params: Params,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        query_y: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Half the squared distance to the adapted weights; query loss and accuracy after adapting."""
        with torch.no_grad():
            fast = self.inner_loop(
                params, support_x, support_y, steps=self.hparams.inner_steps, first_order=True
            )
            logits = self.query_logits(fast, support_x, query_x)
            loss = F.cross_entropy(logits, query_y)
        distance = sum(((params[name] - fast[name]) ** 2).sum() for name in params) / 2
        return distance, {"loss": loss, "acc": (logits.argmax(-1) == query_y).to(loss.dtype).mean()}
