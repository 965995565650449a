"""The LSTM meta-learner (Ravi & Larochelle, 2017): a learned optimizer whose cell state is the learner.

Every trainable parameter of the network is one coordinate of the cell state of an LSTM shared
by all coordinates, written afresh for each episode from the support set:

    c_t = f_t * c_{t-1} - i_t * grad_t,
    i_t = sigmoid(W_I [grad_t, loss_t, c_{t-1}, i_{t-1}] + b_I),   f_t likewise with W_F, b_F,

with gradient and loss preprocessed as in Andrychowicz et al. (2016), i_0 = f_0 = 0, and c_0 the
network's own (meta-learned) parameters. As in the paper, meta-gradients do not flow through the
learner's gradients (no second derivatives); they flow through c_t, the gates and the queries.
`adapt: head` keeps the earlier, cheaper variant: the LSTM writes the linear head only, on
embeddings of a shared encoder that the query loss meta-trains (as in ANIL).

BatchNorm is handled as in MAML here, not as in the paper (which normalised every batch with
its own statistics, queries included): the learner's gradient is taken on the support set
normalised with its own statistics, and queries are normalised as the backbone's `normalisation`
says (by default with their episode's support statistics; metalib.backbones.batchnorm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalib import functional
from metalib.algorithms import base
from metalib.algorithms.base import REGISTRY
from metalib.algorithms.blocks import EpisodicLearner
from metalib.backbones import Classifier, episode_forward
from metalib.functional import Params
from metalib.search_space import LEARNING_RATE, FloatRange, IntRange

ADAPTS = ("all", "head")


@REGISTRY.register("lstm_meta")
class LSTMMeta(EpisodicLearner):
    @dataclass
    class HParams(base.HParams):
        inner_steps: int = 5  # learner updates per episode, in training and at adaptation
        initial_step_size: float = 0.1  # input gate at the start of meta-training
        initial_forget: float = 0.99  # forget gate at the start: close to 1, little decay
        adapt: str = "all"  # "all": every parameter, as published; "head": the linear head only

    SEARCH_SPACE = {
        **LEARNING_RATE,
        "inner_steps": IntRange(1, 10),
        "initial_step_size": FloatRange(0.01, 1.0, log=True),
    }

    def __init__(self, net: Classifier, *, ways: int, num_classes: int, hparams: HParams) -> None:
        super().__init__(net, ways=ways, num_classes=num_classes, hparams=hparams)
        if hparams.adapt not in ADAPTS:
            raise ValueError(f"adapt {hparams.adapt!r}: use one of {', '.join(ADAPTS)}")
        self.input_gate = gate(hparams.initial_step_size)
        self.forget_gate = gate(hparams.initial_forget)

    def learner(
        self, support_x: torch.Tensor, query_x: torch.Tensor
    ) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        """The module whose parameters the LSTM writes, and its support and query inputs [T, n, ...]:
        the whole network on the rows, or (`adapt: head`) the head on the rows' embeddings."""
        if self.hparams.adapt == "all":
            return self.net, support_x, query_x
        return self.net.head, *episode_forward(self.net.encoder, support_x, query_x)

    def unroll(self, module: nn.Module, support: torch.Tensor, support_y: torch.Tensor) -> torch.Tensor:
        """The learner's flat parameters [T, P] after `inner_steps` updates on support inputs [T, S, ...]."""
        start = flatten(trainable(module))
        params = start.expand(support.shape[0], -1)
        input_gate = forget_gate = torch.zeros_like(params)
        for _ in range(self.hparams.inner_steps):
            grad, losses = learner_gradients(module, params, support, support_y)
            grad_features, loss_features = preprocess(grad), preprocess(losses)
            input_gate = gate_values(self.input_gate, grad_features, loss_features, params, input_gate)
            forget_gate = gate_values(self.forget_gate, grad_features, loss_features, params, forget_gate)
            params = forget_gate * params - input_gate * grad
        return params

    def logits(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Query logits [T, Q, ways] under the parameters the meta-learner wrote from each support set
        (a `self.ways`-way head, so `ways` must equal it)."""
        module, support, queries = self.learner(support_x, query_x)
        like = trainable(module)
        written = self.unroll(module, support, support_y)
        return torch.stack(
            [
                functional.query_forward(module, unflatten(params, like), episode_support, episode_queries)
                for params, episode_support, episode_queries in zip(written, support, queries)
            ]
        )


def trainable(module: nn.Module) -> Params:
    """The parameters the meta-learner writes: frozen ones (a frozen pretrained encoder) keep their values."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def flatten(params: Params) -> torch.Tensor:
    return torch.cat([p.flatten() for p in params.values()])


def unflatten(flat: torch.Tensor, like: Params) -> Params:
    """Views of one flat vector [P] shaped as the parameters `like`."""
    pieces = flat.split([p.numel() for p in like.values()])
    return {name: piece.view_as(p) for (name, p), piece in zip(like.items(), pieces)}


def learner_gradients(
    module: nn.Module, params: torch.Tensor, support: torch.Tensor, support_y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each episode's support-loss gradient [T, P] at its parameters [T, P], and the losses [T], as
    constants. Episode by episode, so BatchNorm sees one support set at a time; grad is enabled as
    evaluation may disable it."""
    like = trainable(module)
    grads, losses = [], []
    with torch.enable_grad():
        for flat, x, y in zip(params.detach(), support.detach(), support_y):
            flat.requires_grad_()
            loss = F.cross_entropy(functional_call(module, unflatten(flat, like), (x,)), y)
            grads.append(torch.autograd.grad(loss, flat)[0])
            losses.append(loss.detach())
    return torch.stack(grads), torch.stack(losses)


def gate(initial: float) -> nn.Linear:
    """A coordinate-wise gate's weights over [gradient (2), loss (2), parameter, previous gate]; it
    starts at `initial` whatever its input."""
    if not 0.0 < initial < 1.0:
        raise ValueError(
            f"a gate's initial value is a sigmoid output, so it must lie in (0, 1); got {initial}"
        )
    linear = nn.Linear(2 + 2 + 1 + 1, 1)
    nn.init.zeros_(linear.weight)
    nn.init.constant_(linear.bias, math.log(initial / (1 - initial)))
    return linear


def gate_values(
    linear: nn.Linear,
    grad_features: torch.Tensor,
    loss_features: torch.Tensor,
    params: torch.Tensor,
    previous: torch.Tensor,
) -> torch.Tensor:
    """sigmoid(W [grad, loss, c, previous gate] + b) for every coordinate [T, P], summed feature by
    feature so that no [T, P, 6] input is built (the loss features [T, 2] are one per episode)."""
    w = linear.weight[0]
    per_episode = loss_features @ w[2:4] + linear.bias
    return torch.sigmoid(grad_features @ w[:2] + per_episode[:, None] + w[4] * params + w[5] * previous)


def preprocess(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al.'s scaling of values of any magnitude to two features [..., 2]:
    (log|x| / p, sign x) where |x| >= e^-p, else (-1, e^p x); written with clamps, without branches."""
    magnitude = x.abs().clamp_min(math.exp(-p)).log() / p
    return torch.stack([magnitude, (x * math.exp(p)).clamp(-1.0, 1.0)], -1)
