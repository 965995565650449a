"""MAML's meta-gradient against a plain torch.autograd reference, in float64.

The reference is written independently of metalib's functional code: its own forward pass
(torch's fused batch_norm for batch statistics) and `autograd.grad(create_graph=True)`.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from metalib import EpisodeBatch, algorithms, backbones
from metalib.backbones import Classifier
from metalib.backbones.batchnorm import under_vmap

WAYS, SHOTS, QUERIES, TASKS = 3, 1, 2, 2
INNER_LR = 0.3


def make_net(kind: str, normalisation: str = "support") -> Classifier:
    torch.manual_seed(0)
    if kind == "mlp":
        net = backbones.create("mlp", in_features=6, hidden=[8, 8], ways=WAYS)
    else:
        net = backbones.create("conv4", in_channels=1, hidden=4, ways=WAYS, normalisation=normalisation)
    return net.double()


def make_batch(kind: str) -> EpisodeBatch:
    generator = torch.Generator().manual_seed(1)
    shape = (6,) if kind == "mlp" else (1, 16, 16)
    labels = torch.arange(WAYS)

    def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(TASKS, WAYS * per_class, *shape, generator=generator, dtype=torch.float64)
        return x, labels.repeat_interleave(per_class).expand(TASKS, -1)

    support_x, support_y = draw(SHOTS)
    query_x, query_y = draw(QUERIES)
    return EpisodeBatch(support_x, support_y, query_x, query_y, labels.expand(TASKS, -1))


def reference_forward(
    params: dict[str, torch.Tensor], x: torch.Tensor, support: torch.Tensor | None = None
) -> torch.Tensor:
    """The mlp or conv4 classifier by hand. With `support`, BatchNorm uses the support's statistics."""
    if "encoder.layers.0.weight" in params:
        h = x
        for i in range(0, len(params) - 2, 2):
            h = F.relu(F.linear(h, params[f"encoder.layers.{i}.weight"], params[f"encoder.layers.{i}.bias"]))
        return F.linear(h, params["head.weight"], params["head.bias"])
    h, s = x, support
    for i in range(4):
        conv = (params[f"encoder.blocks.{i}.0.weight"], params[f"encoder.blocks.{i}.0.bias"])
        bn_weight, bn_bias = params[f"encoder.blocks.{i}.1.weight"], params[f"encoder.blocks.{i}.1.bias"]
        h = F.conv2d(h, *conv, padding=1)
        if s is None:
            h = F.batch_norm(h, None, None, bn_weight, bn_bias, training=True)
        else:
            s = F.conv2d(s, *conv, padding=1)
            mean = s.mean((0, 2, 3), keepdim=True)
            std = ((s - mean).pow(2).mean((0, 2, 3), keepdim=True) + 1e-5).sqrt()
            h = (h - mean) / std * bn_weight.view(-1, 1, 1) + bn_bias.view(-1, 1, 1)
            s = F.max_pool2d(F.relu(F.batch_norm(s, None, None, bn_weight, bn_bias, training=True)), 2)
        h = F.max_pool2d(F.relu(h), 2)
    return F.linear(h.mean((2, 3)), params["head.weight"], params["head.bias"])


def reference_meta_gradient(
    net: Classifier,
    batch: EpisodeBatch,
    *,
    steps: int,
    first_order: bool,
    normalisation: str = "support",
    adapted: str = "",
    lrs: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Meta-gradient of the parameters whose names start with `adapted` (all by default), then of `lrs`.

    `lrs`, one tensor per parameter, replaces the shared INNER_LR (Meta-SGD). `normalisation` says
    whose BatchNorm statistics normalise the queries: the support set's, or ("transductive") their own.
    """
    names, params = zip(*net.named_parameters())
    inner = [i for i, name in enumerate(names) if name.startswith(adapted)]
    rates = lrs or [torch.tensor(INNER_LR, dtype=torch.float64)] * len(params)
    total = torch.zeros((), dtype=torch.float64)
    for sx, sy, qx, qy in zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y):
        fast = list(params)
        for _ in range(steps):
            loss = F.cross_entropy(reference_forward(dict(zip(names, fast)), sx), sy)
            grads = torch.autograd.grad(loss, [fast[i] for i in inner], create_graph=not first_order)
            for i, g in zip(inner, grads):
                fast[i] = fast[i] - rates[i] * g
        support = sx if normalisation == "support" else None
        total = total + F.cross_entropy(reference_forward(dict(zip(names, fast)), qx, support), qy)
    return list(torch.autograd.grad(total / batch.num_tasks, [*params, *(lrs or [])]))


def learner_meta_gradient(
    net: Classifier, batch: EpisodeBatch, *, algorithm: str = "maml", steps: int, **hparams: object
) -> list[torch.Tensor]:
    """The gradient that one `meta_train_step` leaves on the learner's parameters (of a copy of `net`)."""
    learner = algorithms.create(
        algorithm, copy.deepcopy(net), ways=WAYS, inner_lr=INNER_LR, inner_steps=steps, **hparams
    )
    learner.meta_train_step(batch)
    return [p.grad for p in learner.parameters()]


def maml_meta_gradient(
    net: Classifier, batch: EpisodeBatch, *, steps: int, first_order: bool, execution: str
) -> list[torch.Tensor]:
    return learner_meta_gradient(net, batch, steps=steps, first_order=first_order, execution=execution)


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    diff = torch.cat([(g - w).flatten() for g, w in zip(got, want)]).norm()
    return (diff / torch.cat([w.flatten() for w in want]).norm()).item()


@pytest.mark.parametrize("execution", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_meta_gradient_matches_autograd_reference(
    kind: str, first_order: bool, steps: int, execution: str
) -> None:
    net, batch = make_net(kind), make_batch(kind)
    want = reference_meta_gradient(net, batch, steps=steps, first_order=first_order)
    got = maml_meta_gradient(net, batch, steps=steps, first_order=first_order, execution=execution)
    assert relative_error(got, want) < 1e-9


# Compiling costs 10-200 s per case with a cold inductor cache (a clean CI machine; 480 s for the
# matrix, measured), so the default suite compiles two cases that together cover several inner steps,
# second order and BatchNorm; `make test-all` (pytest -m "exhaustive or not exhaustive") runs the rest.
EXHAUSTIVE = pytest.mark.exhaustive
COMPILED_CASES = [
    ("mlp", 5, False),
    ("conv4", 1, True),
    *(
        pytest.param(*case, marks=EXHAUSTIVE)
        for case in [
            ("mlp", 1, False),
            ("mlp", 1, True),
            ("mlp", 5, True),
            ("conv4", 1, False),
            ("conv4", 5, False),
        ]
    ),
]


@pytest.mark.parametrize(("kind", "steps", "first_order"), COMPILED_CASES)
def test_compiled_meta_gradient_matches_autograd_reference(kind: str, steps: int, first_order: bool) -> None:
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    net, batch = make_net(kind), make_batch(kind)
    want = reference_meta_gradient(net, batch, steps=steps, first_order=first_order)
    got = maml_meta_gradient(net, batch, steps=steps, first_order=first_order, execution="compile")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it really compiled
    assert relative_error(got, want) < 1e-9


@pytest.mark.parametrize("execution", ["loop", pytest.param("compile", marks=EXHAUSTIVE), "vmap"])
def test_transductive_batchnorm_meta_gradient_matches_reference(execution: str) -> None:
    """The opt-in: queries normalised with their own batch statistics."""
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    net, batch = make_net("conv4", "transductive"), make_batch("conv4")
    want = reference_meta_gradient(net, batch, steps=2, first_order=False, normalisation="transductive")
    got = maml_meta_gradient(net, batch, steps=2, first_order=False, execution=execution)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    assert compiled == (execution == "compile")
    assert relative_error(got, want) < 1e-9
    support = reference_meta_gradient(net, batch, steps=2, first_order=False)
    assert relative_error(support, want) > 1e-3  # the setting changes the model, so it must be logged


@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_second_order_differs_from_first_order(kind: str) -> None:
    """Fails if the second-order path silently drops the graph through the inner loop."""
    net, batch = make_net(kind), make_batch(kind)
    second = maml_meta_gradient(net, batch, steps=1, first_order=False, execution="loop")
    first = maml_meta_gradient(net, batch, steps=1, first_order=True, execution="loop")
    assert relative_error(first, second) > 1e-3


@pytest.mark.parametrize("normalisation", ["support", "transductive"])
def test_conv4_batchnorm_normalises_each_episode_as_the_reference(normalisation: str) -> None:
    """Both of BatchNorm's paths: torch's fused kernel on one batch, and the basic ops that normalise a
    stack of episodes in one pass, each with its own statistics (also the path under vmap and compile)."""
    net, batch = make_net("conv4", normalisation), make_batch("conv4")
    params = dict(net.named_parameters())
    assert backbones.normalisation(net) == normalisation
    support, queries = backbones.episode_forward(net, batch.support_x, batch.query_x)
    for sx, qx, got_support, got_queries in zip(batch.support_x, batch.query_x, support, queries):
        want = reference_forward(params, qx, sx if normalisation == "support" else None)
        assert torch.allclose(got_queries, want, rtol=0, atol=1e-12)
        assert torch.allclose(got_support, reference_forward(params, sx), rtol=0, atol=1e-12)
        assert torch.allclose(net(qx), reference_forward(params, qx), rtol=0, atol=1e-12)


def test_batchnorm_knows_when_it_runs_under_vmap() -> None:
    """The fused kernel's second-order gradient is wrong under vmap, so BatchNorm must see vmap
    through any nesting of transforms."""
    seen: list[bool] = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(under_vmap())
        return x.sum()

    x = torch.randn(3, 2)
    probe(x)
    vmap(probe)(x)
    vmap(grad(probe))(x)
    grad(lambda y: vmap(probe)(y).sum())(x)
    assert seen == [False, True, True, True]


def test_conv4_refuses_images_too_small_for_four_poolings() -> None:
    with pytest.raises(ValueError, match="at least 16x16.*data.image_size"):
        backbones.create("conv4", ways=WAYS, input_shape=(1, 15, 15))


@pytest.mark.parametrize("execution", ["loop", "vmap"])
def test_anil_meta_gradient_adapts_the_head_only(execution: str) -> None:
    net, batch = make_net("conv4"), make_batch("conv4")
    want = reference_meta_gradient(net, batch, steps=3, first_order=False, adapted="head.")
    got = learner_meta_gradient(net, batch, algorithm="anil", steps=3, execution=execution)
    assert relative_error(got, want) < 1e-9


@pytest.mark.parametrize("execution", ["loop", "vmap"])
def test_metasgd_meta_gradient_reaches_the_learned_rates(execution: str) -> None:
    net, batch = make_net("conv4"), make_batch("conv4")
    lrs = [torch.full_like(p, INNER_LR).requires_grad_() for p in net.parameters()]
    want = reference_meta_gradient(net, batch, steps=2, first_order=False, lrs=lrs)
    got = learner_meta_gradient(net, batch, algorithm="metasgd", steps=2, execution=execution)
    assert len(got) == 2 * len(lrs)
    assert relative_error(got, want) < 1e-9


def test_reptile_moves_the_start_towards_the_mean_adapted_weights() -> None:
    net, batch = make_net("mlp"), make_batch("mlp")
    names, start = zip(*((name, p.detach().clone()) for name, p in net.named_parameters()))
    adapted = []
    for sx, sy in zip(batch.support_x, batch.support_y):
        fast = [p.clone().requires_grad_() for p in start]
        for _ in range(3):
            loss = F.cross_entropy(reference_forward(dict(zip(names, fast)), sx), sy)
            fast = [
                (p - INNER_LR * g).detach().requires_grad_()
                for p, g in zip(fast, torch.autograd.grad(loss, fast))
            ]
        adapted.append(fast)
    learner = algorithms.create("reptile", net, ways=WAYS, inner_lr=INNER_LR, inner_steps=3, epsilon=0.25)
    learner.meta_train_step(batch)
    for p, p0, *phis in zip(net.parameters(), start, *adapted):
        want = p0 + 0.25 * (torch.stack(phis).mean(0) - p0)
        assert torch.allclose(p, want, rtol=0, atol=1e-12)
    assert not all(torch.equal(p, p0) for p, p0 in zip(net.parameters(), start))
