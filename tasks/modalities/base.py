"""The interface every modality implements, and the registry that holds them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import datasets
import torch
from tqdm.auto import tqdm

from adaptflow.spec import DataSpec
from metalib.registry import Registry

Normaliser = Callable[[torch.Tensor], torch.Tensor]
LISTS = (datasets.List, datasets.LargeList, datasets.Sequence)  # the feature types of list columns
PROGRESS_ROWS = 20_000  # show a progress bar when converting more rows than this
Item = TypeVar("Item")


class Modality(ABC):
    """How an input column of one kind becomes one tensor per row, and how those are standardised."""

    # metalib modules whose code shapes this modality's tensors: hashed into the prepared-data cache
    # key with the modality's own file, so a change to either prepares the data again
    uses: ClassVar[tuple[ModuleType, ...]] = ()

    @abstractmethod
    def claims(self, feature: Any) -> bool:
        """Whether an input column of this `datasets` feature type holds this modality (for auto)."""

    @abstractmethod
    def tensor(self, table: datasets.Dataset, column: str, data: DataSpec) -> torch.Tensor:
        """The column's rows as one tensor [rows, ...]; a StudyError for inputs it cannot convert."""

    def normaliser(self, reference: torch.Tensor, data: DataSpec) -> Normaliser:
        """Standardisation fitted on the source training rows (`reference`); by default none."""
        return lambda x: x


REGISTRY: Registry[type[Modality]] = Registry("modality")


def progress(items: Iterable[Item], what: str, total: int) -> Iterable[Item]:
    """`items` with a progress bar when there are many (tokenising, converting images)."""
    return tqdm(items, desc=what, total=total, unit="rows", disable=total <= PROGRESS_ROWS, leave=False)
