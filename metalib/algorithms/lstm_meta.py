"""The LSTM meta-learner (Ravi & Larochelle, 2017): a learned optimizer whose cell state is the learner.

The learner here is the linear head on top of the encoder; only the head is adapted per
episode, while the encoder is meta-trained by the query loss (as in ANIL). The head's
parameters are the cell state of a coordinate-wise LSTM shared by every coordinate:

    c_t = f_t * c_{t-1} - i_t * grad_t,
    i_t = sigmoid(W_I [grad_t, loss_t, c_{t-1}, i_{t-1}] + b_I),   f_t likewise with W_F, b_F,

with gradient and loss preprocessed as in Andrychowicz et al. (2016). c_0, the head's initial
parameters, is learned too. As in the paper, meta-gradients do not flow through the
learner's gradients (no second derivatives); they flow through c_t, the gates and the queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalib.algorithms import base
from metalib.algorithms.base import REGISTRY
from metalib.algorithms.blocks import EpisodicLearner
from metalib.backbones import Classifier, episode_forward
from metalib.search_space import LEARNING_RATE, FloatRange, IntRange


@REGISTRY.register("lstm_meta")
class LSTMMeta(EpisodicLearner):
    @dataclass
    class HParams(base.HParams):
        inner_steps: int = 5  # learner updates per episode, in training and at adaptation
        initial_step_size: float = 0.1  # input gate at the start of meta-training
        initial_forget: float = 0.99  # forget gate at the start: close to 1, little decay

    SEARCH_SPACE = {
        **LEARNING_RATE,
        "inner_steps": IntRange(1, 10),
        "initial_step_size": FloatRange(0.01, 1.0, log=True),
    }

    def __init__(self, net: Classifier, *, ways: int, num_classes: int, hparams: HParams) -> None:
        super().__init__(net, ways=ways, num_classes=num_classes, hparams=hparams)
        features = 2 + 2 + 1 + 1  # preprocessed gradient, preprocessed loss, parameter, previous gate
        self.input_gate = gate(features, hparams.initial_step_size)
        self.forget_gate = gate(features, hparams.initial_forget)

    def head_logits(self, features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Logits [T, S, ways] of features [T, S, D] under flat head parameters [T, ways * D + ways]."""
        dim = self.net.embed_dim
        weight = params[:, : self.ways * dim].view(-1, self.ways, dim)
        bias = params[:, self.ways * dim :]
        return features @ weight.transpose(1, 2) + bias.unsqueeze(1)

    def unroll(self, support: torch.Tensor, support_y: torch.Tensor) -> torch.Tensor:
        """Head parameters [T, P] after `inner_steps` learner updates on support embeddings [T, S, D]."""
        head = self.net.head
        params = torch.cat([head.weight.flatten(), head.bias]).expand(support.shape[0], -1)
        input_gate = forget_gate = torch.zeros_like(params)
        for _ in range(self.hparams.inner_steps):
            grad, losses = self.learner_gradient(support.detach(), support_y, params.detach())
            shared = [preprocess(grad), preprocess(losses).unsqueeze(1).expand(-1, params.shape[1], -1)]
            input_gate = self.input_gate(torch.cat([*shared, params[..., None], input_gate[..., None]], -1))
            forget_gate = self.forget_gate(
                torch.cat([*shared, params[..., None], forget_gate[..., None]], -1)
            )
            input_gate, forget_gate = input_gate.squeeze(-1), forget_gate.squeeze(-1)
            params = forget_gate * params - input_gate * grad
        return params

    def learner_gradient(
        self, support: torch.Tensor, support_y: torch.Tensor, params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient [T, P] of each episode's support loss, and the losses [T], as constants."""
        with torch.enable_grad():
            params = params.requires_grad_()
            losses = F.cross_entropy(
                self.head_logits(support, params).flatten(0, 1), support_y.flatten(), reduction="none"
            )
            losses = losses.view(support_y.shape).mean(1)
            (grad,) = torch.autograd.grad(losses.sum(), params)
        return grad, losses.detach()

    def logits(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Query logits [T, Q, ways] under the head the meta-learner wrote from the support set
        (a `self.ways`-way head, so `ways` must equal it)."""
        support, queries = episode_forward(self.net.encoder, support_x, query_x)
        return self.head_logits(queries, self.unroll(support, support_y))


def gate(features: int, initial: float) -> nn.Sequential:
    """A coordinate-wise sigmoid gate that starts at `initial` whatever its input."""
    if not 0.0 < initial < 1.0:
        raise ValueError(
            f"a gate's initial value is a sigmoid output, so it must lie in (0, 1); got {initial}"
        )
    linear = nn.Linear(features, 1)
    nn.init.zeros_(linear.weight)
    nn.init.constant_(linear.bias, math.log(initial / (1 - initial)))
    return nn.Sequential(linear, nn.Sigmoid())


def preprocess(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al.'s scaling of values of any magnitude to two features [..., 2]."""
    large = x.abs() >= math.exp(-p)
    magnitude = torch.where(large, x.abs().clamp_min(math.exp(-p)).log() / p, torch.full_like(x, -1.0))
    sign = torch.where(large, x.sign(), x * math.exp(p))
    return torch.stack([magnitude, sign], -1)
