"""Ranges of hyperparameters, as plain data: each learner declares where a fair search looks.

metalib stays free of any optimiser library; the search (tasks/search.py) turns these into its
sampler's calls. A learner's `SEARCH_SPACE` sits next to its `HParams`, with the ranges a
practitioner would try (learning rates log-uniform), and its defaults inside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False

    def contains(self, value: Any) -> bool:
        return isinstance(value, int | float) and self.low <= value <= self.high


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    log: bool = False

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and self.low <= value <= self.high


@dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]

    def contains(self, value: Any) -> bool:
        return value in self.values


Range = FloatRange | IntRange | Choice
SearchSpace = dict[str, Range]

# The outer learning rate, searched for every learner that uses it.
LEARNING_RATE: SearchSpace = {"lr": FloatRange(1e-4, 1e-2, log=True)}


def parse_range(value: Any) -> Range:
    """A range from a spec: {low, high[, log]} (ints give an IntRange) or {choices: [...]}."""
    if not isinstance(value, dict):
        raise ValueError(
            f"a range is {{low: .., high: .., log: true|false}} or {{choices: [...]}}, not {value!r}"
        )
    keys = set(value)
    if keys == {"choices"}:
        if not isinstance(value["choices"], list) or not value["choices"]:
            raise ValueError("choices must be a non-empty list")
        return Choice(tuple(value["choices"]))
    if keys not in ({"low", "high"}, {"low", "high", "log"}):
        raise ValueError(f"a range has low, high and optionally log, or choices; got {sorted(keys)}")
    low, high, log = value["low"], value["high"], bool(value.get("log", False))
    if not all(isinstance(bound, int | float) and not isinstance(bound, bool) for bound in (low, high)):
        raise ValueError(f"low and high must be numbers, not {low!r} and {high!r}")
    if not low < high:
        raise ValueError(f"low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0, not {low}")
    if isinstance(low, int) and isinstance(high, int):
        return IntRange(low, high, log)
    return FloatRange(float(low), float(high), log)
