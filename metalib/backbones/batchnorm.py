"""How BatchNorm normalises a few-shot episode: the one setting, the layer, and the episode forward pass.

A BatchNorm without running statistics normalises with the statistics of some rows. Which rows
is the backbone's `normalisation` setting (docs/normalisation.md says why "support" is the default):

- "support": every row of an episode, support and queries, is normalised with the statistics
  of that episode's support set (MetaBN, Bronskill et al. 2020), in meta-training and in
  evaluation, so a query's prediction never depends on the other queries;
- "transductive": the support set and the queries of an episode are each normalised with their
  own batch statistics (as in the MAML paper), so a query's prediction depends on the other
  queries. An opt-in, to reproduce results that used it.

Rows that a learner runs on their own (a supervised pre-training batch, MAML's inner loop on a
support set) are normalised with their own statistics under either setting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

try:  # private helpers (torch 2.x); without them BatchNorm always takes the exact basic-ops path
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
except ImportError:
    retrieve_all_functorch_interpreters = None

MODES = ("support", "transductive")


def under_vmap() -> bool:
    """Whether the caller runs inside `torch.func.vmap` (at any depth of nested transforms);
    True whenever the installed torch cannot tell."""
    if retrieve_all_functorch_interpreters is None:
        return True
    return any(layer.key() == TransformType.Vmap for layer in retrieve_all_functorch_interpreters())


class BatchNorm(nn.Module):
    """BatchNorm over batch statistics only, exact under every execution of MAML's inner loop.

    It keeps no running statistics. Outside `episode_forward` it normalises a batch with the
    batch's own statistics; inside, the batch is a stack of episodes of `layout` = (rows per
    episode, rows that give the statistics), and each episode is normalised with the
    statistics of its own first rows. `mode` is the backbone's `normalisation` setting, which
    `episode_forward` reads. Plain batch statistics use torch's fused kernel (1.35-1.5x faster
    per MAML step on CPU than basic ops) except under vmap, where the fused kernel's
    second-order gradient is wrong (1-2% relative error, float64), and under torch.compile,
    whose compiler fuses basic ops itself; there, for per-episode statistics and for a batch
    with one value per channel (which the fused kernel refuses; the output is then `bias`), it
    is written from basic ops, which are exact everywhere.
    """

    def __init__(self, channels: int, mode: str = "support", eps: float = 1e-5) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"normalisation {mode!r}: use one of {', '.join(MODES)}")
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.mode = mode
        self.eps = eps
        self.layout: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group, rows = self.layout or (x.shape[0], x.shape[0])
        plain = rows == x.shape[0] and x.numel() > x.shape[1]
        if plain and not torch.compiler.is_compiling() and not under_vmap():
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        episodes = x.unflatten(0, (-1, group))  # [episodes, group, C, H, W]
        reference = episodes[:, :rows]
        mean = reference.mean((1, 3, 4), keepdim=True)
        var = (reference - mean).square().mean((1, 3, 4), keepdim=True)
        scale = self.weight.view(1, 1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        return ((episodes - mean) * scale + self.bias.view(1, 1, -1, 1, 1)).flatten(0, 1)


def normalisation(net: nn.Module) -> str:
    """How `net` normalises a query, for an MLflow tag and the comparison protocol: "none" (no
    BatchNorm), "support", "transductive", or for torch's own BatchNorm layers "running"
    (running statistics in eval mode) or "transductive" (without them); "+"-joined if mixed."""
    modes = {m.mode for m in net.modules() if isinstance(m, BatchNorm)}
    modes |= {
        "running" if m.track_running_stats else "transductive"
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    return "+".join(sorted(modes)) or "none"


@contextmanager
def _episodes(net: nn.Module, group: int, rows: int) -> Iterator[None]:
    """While open, `net`'s BatchNorm layers see stacks of episodes of `group` rows, each normalised
    with the statistics of its first `rows` rows."""
    layers = [m for m in net.modules() if isinstance(m, BatchNorm)]
    for layer in layers:
        layer.layout = (group, rows)
    try:
        yield
    finally:
        for layer in layers:
            layer.layout = None


def _per_episode(
    net: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int
) -> torch.Tensor:
    """`forward` on episodes [T, N, ...] in one pass, each normalised with its first `rows` rows."""
    with _episodes(net, x.shape[1], rows):
        return forward(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def episode_forward(
    net: nn.Module,
    support_x: torch.Tensor,
    query_x: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs for T episodes' support sets [T, S, ...] and queries [T, Q, ...], normalised as `net`'s
    BatchNorm layers say, each episode on its own.

    `forward` (default `net` itself) maps rows to outputs through `net`'s layers: its encoder, or
    a `functional_call` of it. Every learner's query path goes through here, so no query's output
    depends on another episode, and under "support" not on the other queries either.
    """
    forward = forward or net
    shots = support_x.shape[1]
    if normalisation(net) == "transductive":
        return (
            _per_episode(net, forward, support_x, shots),
            _per_episode(net, forward, query_x, query_x.shape[1]),
        )
    both = _per_episode(net, forward, torch.cat([support_x, query_x], 1), shots)
    return both[:, :shots], both[:, shots:]
