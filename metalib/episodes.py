"""N-way K-shot episodes drawn by one seeded sampler over tensors prepared once.

Every algorithm trains and evaluates on the same `EpisodeBatch` shape, so the data
path is written once. Support and query sets of an episode never share an example.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EpisodeBatch:
    """T episodes stacked: support [T, N*K, ...], query [T, N*Q, ...].

    Labels are episode-local (0..N-1). `classes` [T, N] holds the global class id of
    each episode-local label, for algorithms that pre-train on the global label space.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def ways(self) -> int:
        return self.classes.shape[1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.support_x, self.support_y, self.query_x, self.query_y, self.classes)

    def to(self, device: torch.device | str) -> EpisodeBatch:
        return EpisodeBatch(*(tensor.to(device) for tensor in self.tensors()))

    def global_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Support and query labels mapped back to the global class ids."""
        return (
            torch.gather(self.classes, 1, self.support_y),
            torch.gather(self.classes, 1, self.query_y),
        )


class EpisodeSampler:
    """Draws episodes from one pool of examples (x, y) with its own random generator.

    The same seed gives the same sequence of episodes. Raises ValueError, naming the
    classes at fault, when the pool cannot supply the requested episode shape. `digest()`
    fingerprints every episode drawn so far (the pool rows of each support and query set), so
    two evaluations can prove they met the same episodes before they are paired.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, ways: int, shots: int, queries: int, seed: int
    ) -> None:
        self.x, self.y = x, y
        self.ways, self.shots, self.queries = ways, shots, queries
        self.generator = torch.Generator().manual_seed(seed)
        labels = torch.unique(y)
        self.labels = labels
        self.by_class = [torch.nonzero(y == label).flatten() for label in labels]
        self._digest = hashlib.sha256(f"{ways}-way {shots}-shot {queries}-query".encode())
        problems = episode_shape_problems(y, ways, shots, queries)
        if problems:
            raise ValueError("; ".join(problems))

    def sample(self, num_tasks: int) -> EpisodeBatch:
        per_class = self.shots + self.queries
        picks, classes = [], []
        for _ in range(num_tasks):
            chosen = torch.randperm(len(self.labels), generator=self.generator)[: self.ways]
            classes.append(self.labels[chosen])
            for c in chosen.tolist():
                members = self.by_class[c]
                order = torch.randperm(len(members), generator=self.generator)[:per_class]
                picks.append(members[order])
        index = torch.stack(picks).view(num_tasks, self.ways, per_class)
        local = torch.arange(self.ways).view(1, self.ways, 1)
        support_index = index[:, :, : self.shots].reshape(num_tasks, -1)
        query_index = index[:, :, self.shots :].reshape(num_tasks, -1)
        self._digest.update(torch.cat([support_index, query_index], 1).to(torch.int64).numpy().tobytes())
        return EpisodeBatch(
            support_x=self.x[support_index],
            support_y=local.expand(num_tasks, -1, self.shots).reshape(num_tasks, -1),
            query_x=self.x[query_index],
            query_y=local.expand(num_tasks, -1, self.queries).reshape(num_tasks, -1),
            classes=torch.stack(classes),
        )

    def digest(self) -> str:
        """A hex digest of the rows of every episode sampled so far, in order."""
        return self._digest.hexdigest()


def episode_shape_problems(
    y: torch.Tensor, ways: int, shots: int, queries: int, class_names: list[str] | None = None
) -> list[str]:
    """What stops labels y from yielding N-way K-shot Q-query episodes; empty when nothing does."""
    labels, counts = torch.unique(y, return_counts=True)
    problems = []
    if ways > len(labels):
        problems.append(f"ways={ways} but only {len(labels)} classes are present")
    need = shots + queries
    short = {int(label): int(count) for label, count in zip(labels, counts) if count < need}
    if short:
        listed = ", ".join(
            f"{class_names[label] if class_names else label}: {count}"
            for label, count in sorted(short.items())
        )
        problems.append(f"{len(short)} classes have fewer than shots+queries={need} examples ({listed})")
    return problems


def split_per_class(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split of row indices into (rest, held_out) with `fraction` held out per class."""
    generator = torch.Generator().manual_seed(seed)
    rest, held = [], []
    for label in torch.unique(y):
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_held = int(round(fraction * len(members)))
        held.append(members[:n_held])
        rest.append(members[n_held:])
    return torch.cat(rest).sort().values, torch.cat(held).sort().values
