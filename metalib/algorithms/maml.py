"""MAML (Finn et al., 2017): learn an initialisation that a few gradient steps adapt to a task.

Second order by default: the meta-gradient flows through the inner steps. `first_order`
gives FOMAML, which treats the inner gradients as constants. ANIL, Meta-SGD and Reptile
subclass this class and change one piece each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from metalib import functional
from metalib.algorithms import base
from metalib.algorithms.base import REGISTRY, Algorithm, BatchPredictor, Predictor
from metalib.backbones import Classifier
from metalib.episodes import EpisodeBatch
from metalib.functional import Params
from metalib.search_space import LEARNING_RATE, FloatRange, IntRange

OUTER_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class InnerLoopHParams(base.HParams):
    """What every learner with a gradient-descent inner loop needs."""

    inner_lr: float = 0.4
    inner_steps: int = 1  # during meta-training
    inner_steps_eval: int = 10  # when adapting to a new episode
    # "loop" over tasks, "compile": that loop under torch.compile (20-90 s per shape, then faster on CPU),
    # "vmap" over tasks, "auto": vmap on accelerators, loop on CPU
    execution: str = "auto"


@REGISTRY.register("maml")
class MAML(Algorithm):
    @dataclass
    class HParams(InnerLoopHParams):
        first_order: bool = False
        outer_optimizer: str = "adam"  # or "sgd"; its learning rate is `lr`

    SEARCH_SPACE = {
        **LEARNING_RATE,
        "inner_lr": FloatRange(0.01, 1.0, log=True),
        "inner_steps": IntRange(1, 5),
        "inner_steps_eval": IntRange(1, 20),
    }

    def __init__(self, net: Classifier, *, ways: int, num_classes: int, hparams: InnerLoopHParams) -> None:
        super().__init__(net, ways=ways, num_classes=num_classes, hparams=hparams)
        functional.check_model(net, hparams.execution)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            name = self.hparams.outer_optimizer
            if name not in OUTER_OPTIMIZERS:
                raise ValueError(f"outer_optimizer {name!r}: use one of {', '.join(OUTER_OPTIMIZERS)}")
            self._optimizer = OUTER_OPTIMIZERS[name](self.parameters(), lr=self.hparams.lr)
        return self._optimizer

    def params(self) -> Params:
        """The trainable parameters: frozen ones (a frozen pretrained encoder) are neither adapted nor
        differentiated through; functional_call keeps the module's own values for them."""
        return {name: p for name, p in self.net.named_parameters() if p.requires_grad}

    def inner_lrs(self, names: list[str]) -> dict[str, float | torch.Tensor]:
        """The inner learning rate of each adapted parameter: one shared `inner_lr` here."""
        return dict.fromkeys(names, self.hparams.inner_lr)

    def inner_loop(
        self,
        params: Params,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        *,
        steps: int,
        first_order: bool,
    ) -> Params:
        """Adapts every parameter of the network to the support set."""

        def support_loss(fast: Params) -> torch.Tensor:
            return F.cross_entropy(functional_call(self.net, fast, (support_x,)), support_y)

        return functional.sgd_steps(
            support_loss, params, steps=steps, lrs=self.inner_lrs(list(params)), first_order=first_order
        )

    def query_logits(self, params: Params, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        return functional.query_forward(self.net, params, support_x, query_x)

    def task_objective(
        self,
        params: Params,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        query_y: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One task's query loss after the training-time inner loop, and its metrics."""
        hp = self.hparams
        fast = self.inner_loop(params, support_x, support_y, steps=hp.inner_steps, first_order=hp.first_order)
        logits = self.query_logits(fast, support_x, query_x)
        loss = F.cross_entropy(logits, query_y)
        return loss, {"loss": loss.detach(), "acc": (logits.argmax(-1) == query_y).to(loss.dtype).mean()}

    def meta_train_step(self, batch: EpisodeBatch) -> dict[str, float]:
        self.train()
        self.optimizer.zero_grad(set_to_none=True)
        execution = functional.resolve_execution(self.hparams.execution, batch.query_x.device)
        metrics = functional.meta_backward(self.task_objective, self.params(), batch, execution)
        self.optimizer.step()
        return metrics

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """`inner_steps_eval` steps from the meta-learned start; no graph is kept."""
        self.eval()
        params = {name: p.detach() for name, p in self.params().items()}
        with torch.no_grad():
            fast = self.inner_loop(
                params, support_x, support_y, steps=self.hparams.inner_steps_eval, first_order=True
            )

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.query_logits(fast, support_x, query_x)

        return predict

    def adapt_batch(self, support_x: torch.Tensor, support_y: torch.Tensor) -> BatchPredictor:
        """`adapt`'s inner loop vmapped over the chunk's episodes, each with its own fast weights; episode
        by episode with `execution: loop | compile`, or where the encoder cannot run under vmap."""
        if self.hparams.execution in ("loop", "compile") or not getattr(self.net.encoder, "vmappable", True):
            return super().adapt_batch(support_x, support_y)
        self.eval()
        params = {name: p.detach() for name, p in self.params().items()}

        def adapt_one(x: torch.Tensor, y: torch.Tensor) -> Params:
            return self.inner_loop(params, x, y, steps=self.hparams.inner_steps_eval, first_order=True)

        with torch.no_grad():
            fast = vmap(adapt_one)(support_x, support_y)

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return vmap(self.query_logits)(fast, support_x, query_x)

        return predict
