"""N-way K-shot episodes over tensors prepared once: drawn by a seeded sampler, or fixed by the data.

Every algorithm trains and evaluates on the same `EpisodeBatch` shape, so the data
path is written once. Support and query sets of an episode never share an example.
Fixed episodes (`FixedEpisodes`) are how benchmarks with published test episodes are defined
(Lake et al.'s 20 Omniglot one-shot runs, ARSC): each row names its episode and its role.
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


class FixedEpisodes:
    """The episodes a dataset defines: `episode` [rows] numbers each row's episode, `support` [rows]
    marks its support rows (the others are its queries).

    Same interface as EpisodeSampler: `sample(n)` returns the next episodes in order (fewer than n where
    the episode shape changes, so a batch stacks), and `digest()` fingerprints those returned. Labels
    are made episode-local in the order of the episode's classes. Raises ValueError naming the episode
    when one is not a proper few-shot episode (fixed_episode_problems).
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, episode: torch.Tensor, support: torch.Tensor
    ) -> None:
        problems = fixed_episode_problems(y, episode, support)
        if problems:
            raise ValueError("; ".join(problems))
        self.x, self.y = x, y
        self.episodes = [_episode_rows(y, rows, support[rows]) for rows in _rows_by_episode(episode)]
        self.position = 0
        self._digest = hashlib.sha256(b"fixed episodes")

    def __len__(self) -> int:
        return len(self.episodes)

    def shapes(self) -> set[tuple[int, int]]:
        """The (ways, shots) of the episodes."""
        return {(len(classes), len(support) // len(classes)) for support, _, classes in self.episodes}

    def sample(self, num_tasks: int) -> EpisodeBatch:
        if self.position >= len(self.episodes):
            raise ValueError(f"all {len(self.episodes)} fixed episodes have been used")
        first = self.episodes[self.position]
        shape = (len(first[0]), len(first[1]), len(first[2]))
        chosen = []
        for support, query, classes in self.episodes[self.position : self.position + num_tasks]:
            if (len(support), len(query), len(classes)) != shape:
                break
            chosen.append((support, query, classes))
        self.position += len(chosen)
        support_index = torch.stack([support for support, _, _ in chosen])
        query_index = torch.stack([query for _, query, _ in chosen])
        classes = torch.stack([classes for _, _, classes in chosen])
        self._digest.update(torch.cat([support_index, query_index], 1).numpy().tobytes())
        return EpisodeBatch(
            support_x=self.x[support_index],
            support_y=self._local(support_index, classes),
            query_x=self.x[query_index],
            query_y=self._local(query_index, classes),
            classes=classes,
        )

    def _local(self, rows: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Episode-local labels: each row's position among its episode's classes."""
        return (self.y[rows].unsqueeze(-1) == classes.unsqueeze(1)).long().argmax(-1)

    def digest(self) -> str:
        """A hex digest of the rows of every episode returned so far, in order."""
        return self._digest.hexdigest()


def fixed_episode_problems(y: torch.Tensor, episode: torch.Tensor, support: torch.Tensor) -> list[str]:
    """What keeps each fixed episode from being few-shot: every class of its queries must have support
    rows, and every support class the same number of them. Empty when nothing does."""
    problems = []
    for number, rows in zip(torch.unique(episode).tolist(), _rows_by_episode(episode)):
        is_support = support[rows]
        support_labels, counts = torch.unique(y[rows][is_support], return_counts=True)
        query_labels = torch.unique(y[rows][~is_support])
        if len(support_labels) < 2 or not len(query_labels):
            problems.append(
                f"episode {number} has {len(support_labels)} support class(es) and "
                f"{int((~is_support).sum())} query row(s); it needs 2 or more classes and a query"
            )
        elif len(set(counts.tolist())) > 1:
            problems.append(
                f"episode {number} has {sorted(set(counts.tolist()))} support rows per class; "
                "each class needs the same number (the shots)"
            )
        elif not set(query_labels.tolist()) <= set(support_labels.tolist()):
            extra = sorted(set(query_labels.tolist()) - set(support_labels.tolist()))
            problems.append(f"episode {number} has queries of class(es) {extra} without support rows")
    return problems


def _rows_by_episode(episode: torch.Tensor) -> list[torch.Tensor]:
    """Row indices of each episode, episodes in increasing number, rows in data order."""
    return [torch.nonzero(episode == number).flatten() for number in torch.unique(episode)]


def _episode_rows(
    y: torch.Tensor, rows: torch.Tensor, is_support: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(support rows, query rows, classes) of one episode; support rows grouped by class."""
    classes = torch.unique(y[rows][is_support])
    support = torch.cat([rows[is_support & (y[rows] == c)] for c in classes])
    return support, rows[~is_support], classes


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
