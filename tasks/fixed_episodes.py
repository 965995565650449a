"""The fixed-episode layout (data.fixed_episodes): target episodes defined by the data, as published
benchmarks fix their test episodes. Read here per target domain; prepare keeps those domains' rows as
they are (one input may be in two episodes) and their labels apart (they name classes per episode)."""

from __future__ import annotations

import datasets
import torch

from adaptflow.errors import StudyError
from adaptflow.spec import EpisodeSpec, FixedEpisodeSpec
from metalib import FixedEpisodes


def read(name: str, table: datasets.Dataset, fixed: FixedEpisodeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(episode number, is-support) per row of target domain `name`, whose table has both columns.

    Episodes are numbered in the sorted order of the episode column's values (numbers as numbers).
    """
    columns = table.select_columns([fixed.episode, fixed.role])[:]
    values, roles = columns[fixed.episode], [str(role) for role in columns[fixed.role]]
    if any(value is None for value in values):
        raise StudyError(f"target domain {name!r}: column {fixed.episode!r} has rows without an episode")
    unknown = sorted(set(roles) - {fixed.support, fixed.query})
    if unknown:
        raise StudyError(
            f"target domain {name!r}: column {fixed.role!r} holds {unknown}, neither the support value "
            f"{fixed.support!r} nor the query value {fixed.query!r}; set data.fixed_episodes.support / .query"
        )
    number = {value: i for i, value in enumerate(sorted(set(values)))}
    episode = torch.tensor([number[value] for value in values], dtype=torch.long)
    return episode, torch.tensor([role == fixed.support for role in roles])


def check_shape(name: str, rows: tuple[torch.Tensor, ...], asked: EpisodeSpec) -> None:
    """Target domain `name`'s fixed episodes, from its (x, y, episode, support) rows, must be few-shot
    episodes of the shape the spec evaluates."""
    try:
        shapes = FixedEpisodes(*rows).shapes()
    except ValueError as exc:
        raise StudyError(f"target domain {name!r}: {exc}") from None
    ways, shots = sorted({w for w, _ in shapes}), sorted({k for _, k in shapes})
    if ways != [asked.ways] or shots != asked.shots:
        raise StudyError(
            f"target domain {name!r} has fixed episodes of ways {ways} and shots {shots}, but the spec "
            f"asks for episodes.ways={asked.ways}, episodes.shots={asked.shots}; set "
            f"episodes.ways: {ways[0]} and episodes.shots: {shots} (fixed episodes are evaluated as "
            "the data defines them)"
        )
