"""Prepare: load a dataset with Hugging Face `datasets`, split it into domains, make tensors once.

The result holds one shared label space, the source domains split into train and
validation pools, and one pool per target domain. Every problem with the data is
reported here, before any training, with what to change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from prefect import task

from adaptflow.errors import StudyError
from adaptflow.spec import DataSpec, StudySpec
from metalib import episode_shape_problems, split_per_class
from tasks.caching import stable_inputs


@dataclass(frozen=True)
class Pool:
    """Examples (x) with global labels (y) from one or more domains."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class PreparedData:
    """Tensors for a study: source train/validation pools and one pool per target domain."""

    source_train: Pool
    source_val: Pool
    targets: dict[str, Pool]
    class_names: list[str]
    fingerprint: str  # of the loaded dataset and the preparation settings
    rows_per_domain: dict[str, int]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.source_train.x.shape[1:])


def load_table(data: DataSpec) -> datasets.Dataset:
    """All rows of the dataset as one table, whatever splits it was stored in."""
    try:
        loaded = datasets.load_dataset(data.path, data_files=data.data_files, revision=data.revision)
    except FileNotFoundError as exc:
        raise StudyError(
            f"data.path {data.path!r} was not found as a local folder, file or hub dataset ({exc}). "
            "Check the path, or give data_files."
        ) from None
    except ConnectionError as exc:
        raise StudyError(
            f"data.path {data.path!r} could not be reached ({exc}). It looks like a hub id while "
            "offline: download it once with network access (it is then cached), or point data.path "
            "at a local copy."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        return datasets.concatenate_datasets(list(loaded.values()))
    return loaded


def prepare(data: DataSpec, source: list[str], target: list[str]) -> PreparedData:
    """Loads, checks and tensorises the data a study needs; raises StudyError on bad input."""
    table = load_table(data)
    missing = [column for column in (data.input, data.label, data.domain) if column not in table.column_names]
    if missing:
        raise StudyError(
            f"column(s) {missing} not in the dataset; its columns are {table.column_names}. "
            "Set data.input / data.label / data.domain to the right names."
        )
    domains = np.asarray(_column(table, data.domain))
    present = sorted(set(domains.tolist()))
    unknown = [name for name in [*source, *target] if name not in present]
    if unknown:
        raise StudyError(f"domain(s) {unknown} not found in column {data.domain!r}; the data has: {present}")
    class_names, labels = _label_space(table, data.label)
    inputs = _feature_tensor(table, data.input)

    def rows(domain: str) -> np.ndarray:
        return np.nonzero(domains == domain)[0]

    source_rows = np.concatenate([rows(d) for d in source])
    source_y = labels[source_rows]
    train_idx, val_idx = split_per_class(source_y, data.val_fraction, data.split_seed)
    train_rows, val_rows = source_rows[train_idx.numpy()], source_rows[val_idx.numpy()]
    inputs = _normalise(inputs, data.log1p, reference=torch.as_tensor(train_rows))

    def pool(index: np.ndarray) -> Pool:
        index_t = torch.as_tensor(index)
        return Pool(inputs[index_t], labels[index_t])

    prepared = PreparedData(
        source_train=pool(train_rows),
        source_val=pool(val_rows),
        targets={domain: pool(rows(domain)) for domain in target},
        class_names=class_names,
        fingerprint=_fingerprint(table, data, source, target),
        rows_per_domain={domain: len(rows(domain)) for domain in [*source, *target]},
    )
    return prepared


@task(name="prepare", cache_policy=stable_inputs(), persist_result=True, tags=["cpu"])
def prepare_data(data: DataSpec, source: list[str], target: list[str]) -> PreparedData:
    """Prefect task around `prepare`, cached on the data settings and the domains."""
    return prepare(data, source, target)


def check_episode_shapes(spec: StudySpec, prepared: PreparedData) -> None:
    """Every pool must supply its episodes: enough classes, enough examples per class."""
    ways, queries = spec.episodes.ways, spec.episodes.queries
    needs = [
        ("source training pool", prepared.source_train, spec.train_shots),
        ("source validation pool", prepared.source_val, spec.train_shots),
        *(
            (f"target domain {name!r}", pool, max(spec.episodes.shots))
            for name, pool in prepared.targets.items()
        ),
    ]
    problems = [
        f"{what}: {problem}"
        for what, pool, shots in needs
        for problem in episode_shape_problems(pool.y, ways, shots, queries, prepared.class_names)
    ]
    if problems:
        raise StudyError(
            "the data cannot supply the episodes asked for:\n  "
            + "\n  ".join(problems)
            + f"\nAsked: ways={ways}, shots up to {max(spec.episodes.shots)} (training shots "
            f"{spec.train_shots}), queries={queries}, data.val_fraction={spec.data.val_fraction}. "
            "Lower episodes.ways, episodes.shots or episodes.queries, or drop the domain."
        )


def _label_space(table: datasets.Dataset, column: str) -> tuple[list[str], torch.Tensor]:
    """Class names and integer labels: by name for ClassLabel or strings, by value for numbers."""
    feature = table.features[column]
    values = _column(table, column)
    if isinstance(feature, datasets.ClassLabel):
        values = [feature.int2str(value) for value in values]
    names = sorted(set(values), key=lambda value: (str(type(value)), value))
    index = {name: i for i, name in enumerate(names)}
    return [str(name) for name in names], torch.tensor([index[value] for value in values])


def _feature_tensor(table: datasets.Dataset, column: str) -> torch.Tensor:
    """Numeric feature vectors as a float32 [rows, features] tensor."""
    array = table.select_columns([column]).with_format("numpy")[:][column]
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):
        raise StudyError(
            f"column {column!r} does not hold numeric feature vectors of one length "
            f"(feature type: {table.features[column]}); set data.input to such a column."
        )
    return torch.as_tensor(array, dtype=torch.float32).reshape(len(table), -1)


def _column(table: datasets.Dataset, name: str) -> list:
    """One column as a Python list."""
    return table.select_columns([name])[:][name]


def _normalise(inputs: torch.Tensor, log1p: bool, reference: torch.Tensor) -> torch.Tensor:
    """Optional log(1+x), then standardise with statistics of the source training rows only."""
    if log1p:
        inputs = torch.log1p(inputs.clamp_min(0))
    mean = inputs[reference].mean(0)
    std = inputs[reference].std(0).clamp_min(1e-6)
    return (inputs - mean) / std


def _fingerprint(table: datasets.Dataset, data: DataSpec, source: list[str], target: list[str]) -> str:
    settings = json.dumps([table._fingerprint, data.model_dump(mode="json"), source, target], sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:16]
