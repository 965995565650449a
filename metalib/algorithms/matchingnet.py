"""Matching Networks (Vinyals et al., 2016): a query's label is an attention-weighted vote of the support.

Attention is a softmax over cosine similarities (times 10, as protonet's cosine) to every
support example, so with `fce=False` the prediction does not depend on support order. Full-context
embeddings (`fce=True`) let each support embedding see the whole support set through a
bidirectional LSTM, and refine each query embedding with an attention LSTM over the support.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalib.algorithms import base
from metalib.algorithms.base import REGISTRY
from metalib.algorithms.blocks import EpisodicLearner
from metalib.algorithms.prototypes import distance_logits
from metalib.backbones import Classifier, episode_forward


@REGISTRY.register("matchingnet")
class MatchingNet(EpisodicLearner):
    @dataclass
    class HParams(base.HParams):
        fce: bool = False  # full-context embeddings
        fce_steps: int = 3  # attention-LSTM read steps per query (with fce)

    def __init__(self, net: Classifier, *, ways: int, num_classes: int, hparams: HParams) -> None:
        super().__init__(net, ways=ways, num_classes=num_classes, hparams=hparams)
        if hparams.fce:
            dim = net.embed_dim
            self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
            self.query_cell = nn.LSTMCell(2 * dim, dim)

    fixed_ways = False

    def logits(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Log-probabilities [T, Q, ways]: per class, the log of the attention on its support examples."""
        support, queries = episode_forward(self.net.encoder, support_x, query_x)
        if self.hparams.fce:
            support = self.contextual_support(support)
            queries = self.contextual_queries(queries, support)
        similarity = distance_logits(queries, support, "cosine")  # 10 * cosine, [T, Q, S]
        in_class = F.one_hot(support_y, ways).bool()[:, None]  # [T, 1, S, N]
        per_class = similarity.unsqueeze(-1).masked_fill(~in_class, float("-inf")).logsumexp(2)
        return per_class - similarity.logsumexp(-1, keepdim=True)

    def contextual_support(self, support: torch.Tensor) -> torch.Tensor:
        """g(x_i) = g'(x_i) + forward state + backward state of a BiLSTM over the support [T, S, D]."""
        states, _ = self.support_lstm(support)
        forward, backward = states.chunk(2, dim=-1)
        return support + forward + backward

    def contextual_queries(self, queries: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """f(x) = h_K after K steps of Vinyals et al.'s attention LSTM over the support g(x_i) (appendix A.2):

            r_{k-1} = sum_i softmax_i(h_{k-1}^T g(x_i)) g(x_i),
            h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1}),    h_k = h^_k + f'(x),

        from h_0 = f'(x) (h^_0 = 0) and c_0 = 0. The LSTM's input is f'(x) and its state [h, r] is 2D
        wide, but its output h^ is D wide, so its cell is D wide and its gates are W f'(x) + U [h, r] + b.
        That is what an LSTMCell computes from input [f'(x), r_{k-1}] and state h_{k-1}: U's
        r-columns sit in the input weights. (An LSTMCell(D, 2D) whose first D outputs are h^ computes
        the same, plus a second half of cell and gates that never reaches h^.)
        """
        num_tasks, num_queries, dim = queries.shape
        flat = queries.flatten(0, 1)  # [T*Q, D]
        keys = support.repeat_interleave(num_queries, dim=0)  # [T*Q, S, D]
        hidden, cell = flat, torch.zeros_like(flat)
        for _ in range(self.hparams.fce_steps):
            attention = torch.softmax((keys @ hidden.unsqueeze(-1)).squeeze(-1), dim=-1)  # [T*Q, S]
            read = (attention.unsqueeze(-1) * keys).sum(1)
            hidden, cell = self.query_cell(torch.cat([flat, read], dim=-1), (hidden, cell))
            hidden = hidden + flat
        return hidden.view(num_tasks, num_queries, dim)
