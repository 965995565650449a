"""Learners as published (#16): each learner's update, written out by hand from its paper, against the code.

Toy episodes and an mlp in float64; the references use plain autograd on the network's own parameters,
so a learner that adapted fewer parameters, read the wrong state or differentiated through the
learner's gradients would not match.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import metalib
from metalib import algorithms, backbones
from metalib.algorithms import Algorithm, lstm_meta
from metalib.algorithms.matchingnet import MatchingNet

WAYS, FEATURES = 5, 12


def toy_learner(name: str, **hparams: object) -> Algorithm:
    torch.manual_seed(0)
    net = backbones.create("mlp", in_features=FEATURES, hidden=[16, 8], ways=WAYS)
    return algorithms.create(name, net, ways=WAYS, num_classes=8, **hparams).double()


def toy_episodes(num_tasks: int = 2) -> metalib.EpisodeBatch:
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(160) % 8
    centres = torch.randn(8, FEATURES, generator=generator)
    x = centres[y] + 0.5 * torch.randn(160, FEATURES, generator=generator)
    return metalib.EpisodeSampler(x.double(), y, WAYS, shots=2, queries=3, seed=0).sample(num_tasks)


def andrychowicz(x: torch.Tensor, p: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log|x| / p, sign x) where |x| >= e^-p, else (-1, e^p x): Andrychowicz et al. (2016), appendix A."""
    large = x.abs() >= math.exp(-p)
    return (
        torch.where(large, x.abs().clamp_min(math.exp(-p)).log() / p, -1.0),
        torch.where(large, x.sign(), math.exp(p) * x),
    )


def ravi_larochelle_gate(
    gate: torch.nn.Linear, grad: torch.Tensor, loss: torch.Tensor, theta: torch.Tensor, previous: torch.Tensor
) -> torch.Tensor:
    """sigmoid(W [grad_t, L_t, theta_{t-1}, previous gate] + b), one coordinate at a time."""
    w, b = gate.weight[0], gate.bias[0]
    inputs = [*andrychowicz(grad), *andrychowicz(loss), theta, previous]
    return torch.sigmoid(sum(weight * value for weight, value in zip(w, inputs)) + b)


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_lstm_meta_updates_the_learner_as_ravi_and_larochelle(adapt: str) -> None:
    """c_t = f_t * c_{t-1} - i_t * grad_t over every parameter of the network (`adapt: head`: of the
    head, on embeddings), c_0 the network's parameters, i_0 = f_0 = 0, and no second derivatives: the
    learner's gradients and losses are constants for the meta-gradient, which is checked too."""
    learner = toy_learner("lstm_meta", inner_steps=2, adapt=adapt)
    with torch.no_grad():  # gates that depend on every input, so that each one is checked
        for gate in (learner.input_gate, learner.forget_gate):
            gate.weight.copy_(torch.linspace(-0.3, 0.4, 6, dtype=torch.float64))
    batch = toy_episodes()
    net = learner.net
    module = net if adapt == "all" else net.head

    def inputs(x: torch.Tensor) -> torch.Tensor:
        return x if adapt == "all" else net.encoder(x)

    reference_loss = torch.zeros((), dtype=torch.float64)
    for support_x, support_y, query_x, query_y in zip(
        batch.support_x, batch.support_y, batch.query_x, batch.query_y
    ):
        theta = dict(module.named_parameters())
        input_gate = {name: torch.zeros_like(p) for name, p in theta.items()}
        forget_gate = dict(input_gate)
        for _ in range(2):
            loss = F.cross_entropy(functional_call(module, theta, (inputs(support_x),)), support_y)
            grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()), retain_graph=True)))
            grads, loss = {name: g.detach() for name, g in grads.items()}, loss.detach()
            for name in theta:
                input_gate[name] = ravi_larochelle_gate(
                    learner.input_gate, grads[name], loss, theta[name], input_gate[name]
                )
                forget_gate[name] = ravi_larochelle_gate(
                    learner.forget_gate, grads[name], loss, theta[name], forget_gate[name]
                )
            theta = {
                name: forget_gate[name] * p - input_gate[name] * grads[name] for name, p in theta.items()
            }
        logits = functional_call(module, theta, (inputs(query_x),))
        reference_loss = reference_loss + F.cross_entropy(logits, query_y, reduction="sum")
        written = learner.unroll(*learner.learner(support_x[None], query_x[None])[:2], support_y[None])[0]
        for name, value in lstm_meta.unflatten(written, lstm_meta.trainable(module)).items():
            torch.testing.assert_close(value, theta[name])
            assert not torch.allclose(value, module.get_parameter(name)), f"{name} was not written"

    code_logits = learner.logits(batch.support_x, batch.support_y, batch.query_x, WAYS)
    code_loss = F.cross_entropy(code_logits.flatten(0, 1), batch.query_y.flatten())
    reference_loss = reference_loss / batch.query_y.numel()
    torch.testing.assert_close(code_loss, reference_loss)
    parameters = list(learner.parameters())
    for code, reference in zip(
        torch.autograd.grad(code_loss, parameters), torch.autograd.grad(reference_loss, parameters)
    ):
        torch.testing.assert_close(code, reference)


def vinyals_attention_lstm(
    f_prime: torch.Tensor, g: torch.Tensor, cell: torch.nn.LSTMCell, steps: int
) -> torch.Tensor:
    """Appendix A.2 for one query f'(x) [D] and support g(x_i) [S, D], one vector at a time:
    r_{k-1} = sum_i softmax(h_{k-1}^T g(x_i)) g(x_i); gates = W f'(x) + U [h_{k-1}, r_{k-1}] + b;
    c_k = sigma(f) c_{k-1} + sigma(i) tanh(g); h^_k = sigma(o) tanh(c_k); h_k = h^_k + f'(x)."""
    dim = f_prime.shape[0]
    w = cell.weight_ih[:, :dim]  # weights of the LSTM's input, f'(x)
    u = torch.cat([cell.weight_hh, cell.weight_ih[:, dim:]], 1)  # weights of its state, [h, r]
    b = cell.bias_ih + cell.bias_hh
    h, c = f_prime, torch.zeros_like(f_prime)
    for _ in range(steps):
        r = torch.softmax(g @ h, 0) @ g
        i, f, candidate, o = (w @ f_prime + u @ torch.cat([h, r]) + b).chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(candidate)
        h = torch.sigmoid(o) * torch.tanh(c) + f_prime
    return h


@pytest.mark.parametrize("steps", [1, 3])
def test_matchingnet_query_embedding_follows_vinyals_et_al_appendix(steps: int) -> None:
    learner = toy_learner("matchingnet", fce=True, fce_steps=steps)
    assert isinstance(learner, MatchingNet)
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(2, 3, 8, generator=generator, dtype=torch.float64)
    support = torch.randn(2, 4, 8, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        code = learner.contextual_queries(queries, support)
        reference = torch.stack(
            [
                torch.stack([vinyals_attention_lstm(q, g, learner.query_cell, steps) for q in episode])
                for episode, g in zip(queries, support)
            ]
        )
    torch.testing.assert_close(code, reference)
