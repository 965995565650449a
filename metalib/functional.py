"""The inner loop shared by the optimization-based learners, on torch.func.

Parameters are plain dicts passed to `functional_call`, so one task's adaptation is a
pure function: it can run task by task (the default on CPU), task by task under
`torch.compile` (faster on CPU once compiled), or under `vmap` over the tasks of a
meta-batch (for GPUs); all give the same meta-gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from metalib.backbones import episode_forward
from metalib.episodes import EpisodeBatch

Params = dict[str, torch.Tensor]
TaskFn = Callable[
    [Params, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, dict[str, torch.Tensor]],
]

EXECUTIONS = ("auto", "loop", "compile", "vmap")


def sgd_steps(
    loss_fn: Callable[[Params], torch.Tensor],
    params: Params,
    *,
    steps: int,
    lrs: Mapping[str, float | torch.Tensor],
    first_order: bool,
) -> Params:
    """`steps` steps of gradient descent on `loss_fn`, one learning rate per parameter.

    The result stays differentiable through every step (second order) unless `first_order`
    or autograd is off: then the inner gradients are constants and the adapted parameters
    depend on `params` and `lrs` only through the update itself.
    """
    grad_fn = grad(loss_fn)
    keep_graph = torch.is_grad_enabled() and not first_order
    for _ in range(steps):
        with torch.set_grad_enabled(keep_graph):
            grads = grad_fn(params)
        params = {name: p - lrs[name] * grads[name] for name, p in params.items()}
    return params


def query_forward(
    net: nn.Module, params: Params, support_x: torch.Tensor, query_x: torch.Tensor
) -> torch.Tensor:
    """`net` under `params` on the queries of one episode, normalised as its BatchNorm layers say
    (by default with the support set's statistics; see metalib.backbones.batchnorm)."""
    forward = partial(functional_call, net, params)
    return episode_forward(net, support_x[None], query_x[None], forward)[1][0]


def check_model(net: nn.Module, execution: str) -> None:
    """Refuses settings that would run but give wrong results, naming the fix."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution {execution!r}: use one of {', '.join(EXECUTIONS)}")
    fused = [name for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if fused and execution in ("compile", "vmap"):
        raise ValueError(
            f"modules {', '.join(fused)} use torch's fused BatchNorm, which gives wrong second-order "
            "gradients under vmap (compile: unchecked); use metalib.backbones.batchnorm.BatchNorm"
        )


def resolve_execution(execution: str, device: torch.device) -> str:
    """'auto' batches tasks with vmap on accelerators and loops over them on CPU, where vmap is slower."""
    if execution == "auto":
        return "loop" if device.type == "cpu" else "vmap"
    return execution


def meta_backward(task_fn: TaskFn, params: Params, batch: EpisodeBatch, execution: str) -> dict[str, float]:
    """Backpropagates the mean over tasks of `task_fn`'s objective; returns its metrics averaged over tasks.

    `task_fn(params, support_x, support_y, query_x, query_y)` returns (objective, metrics) for one
    task. The loop backpropagates task by task, so only one task's graph is alive at a time;
    "compile" runs the same loop with `task_fn` under torch.compile: compiled on the first call
    (20-90 s for conv4) and reused while the learner class, settings and episode shapes stay the
    same, also by new learners. Each new combination compiles again, and past torch's
    recompile limit (`torch._dynamo.config.recompile_limit`, 8) more combinations in one
    process run uncompiled, as fast as "loop".
    """
    tensors = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    if execution == "vmap":
        objectives, metrics = vmap(task_fn, in_dims=(None, 0, 0, 0, 0), randomness="different")(
            params, *tensors
        )
        objectives.mean().backward()
        return {name: values.mean().item() for name, values in metrics.items()}
    if execution == "compile":
        task_fn = torch.compile(task_fn, dynamic=False)
    per_task: dict[str, list[torch.Tensor]] = {}
    for task in zip(*tensors):
        objective, metrics = task_fn(params, *task)
        (objective / batch.num_tasks).backward()
        for name, value in metrics.items():
            per_task.setdefault(name, []).append(value.detach())
    return {name: torch.stack(values).mean().item() for name, values in per_task.items()}
