"""Prepare: load data with Hugging Face `datasets`, split it into domains, make tensors once.

Domains come from a column of one dataset, or from one dataset, config or split per domain
(`data.domains`). Inputs are made tensors by a modality (tasks/modalities/: feature vectors, text,
images), chosen from the input column's feature type (or `data.modality`); target episodes may be
fixed by the data (tasks/fixed_episodes.py). The result holds one label space aligned by class name,
the source domains split into train and validation pools, and one pool per target domain,
with duplicate inputs removed. Every problem with the data is reported here, before any
training, with what to change. Results are cached on disk, keyed by the dataset fingerprints
and the preparation settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from prefect import task
from prefect.logging import get_run_logger

from adaptflow.errors import StudyError
from adaptflow.settings import PROJECT_DIR
from adaptflow.spec import MODALITIES, DataSpec, FixedEpisodeSpec, StudySpec
from metalib import episode_shape_problems, split_per_class
from metalib.device import one_thread
from tasks import fixed_episodes, loading, modalities
from tasks.caching import stable_inputs
from tasks.loading import Domain, check_columns, load_domains

CACHE_DIR = PROJECT_DIR / ".cache" / "prepared"
CODE_VERSION = hashlib.sha256(
    b"".join(
        path.read_bytes()
        for path in (
            Path(__file__),
            Path(loading.__file__),
            Path(fixed_episodes.__file__),
            *modalities.source_files(),
        )
    )
).hexdigest()


@dataclass(frozen=True)
class Pool:
    """Examples (x) with global labels (y) from one or more domains."""

    x: torch.Tensor
    y: torch.Tensor
    # source pools: each row's domain, as an index into the spec's `source` list (for leave-one-out)
    domain: torch.Tensor | None = None
    # target pools with fixed episodes (data.fixed_episodes): each row's episode number, and whether
    # it is a support row (else a query)
    episode: torch.Tensor | None = None
    support: torch.Tensor | None = None

    def where(self, rows: torch.Tensor) -> Pool:
        """The rows selected by a boolean mask."""
        return Pool(*(None if part is None else part[rows] for part in self.parts()))

    def parts(self) -> tuple[torch.Tensor | None, ...]:
        return (self.x, self.y, self.domain, self.episode, self.support)

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class PreparedData:
    """Tensors for a study: source train/validation pools and one pool per target domain."""

    source_train: Pool
    source_val: Pool
    targets: dict[str, Pool]  # evaluation rows only
    target_unlabelled: dict[str, torch.Tensor]  # inputs held out for unsupervised adaptation (may be empty)
    class_names: list[str]
    fingerprint: str  # of the loaded datasets and the preparation settings
    rows_per_domain: dict[str, int]  # after removing duplicates
    modality: str  # a name in adaptflow.spec.MODALITIES
    duplicates_dropped: dict[str, int]  # per domain, and "source" for repeats across source domains
    # target domain -> classes other domains have and it lacks, for a target that shares classes
    # with them (source domains are pooled, and may well have classes of their own, as Omniglot's
    # alphabets do; a target with only classes of its own is the usual few-shot split, not a gap)
    missing_classes: dict[str, list[str]]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.source_train.x.shape[1:])


def prepare(
    data: DataSpec, source: list[str], target: list[str], cache: Path | None = CACHE_DIR
) -> PreparedData:
    """Loads, checks and tensorises the data a study needs; raises StudyError on bad input.

    With `cache`, a result prepared before from the same datasets and settings is read back. The
    tensor work runs on one torch thread: a study prepares in the flow's own thread and trains in task
    threads, which a torch thread team left by the flow's thread slows (`metalib.device.one_thread`).
    """
    domains = load_domains(data, [*source, *target])
    fingerprint = _fingerprint(domains, data, source, target)
    path = cache / f"{fingerprint}.pt" if cache else None
    with one_thread():
        prepared = _read_cache(path) if path else None
        if prepared is None:
            prepared = _prepare(domains, data, source, target, fingerprint)
            if path:
                _write_cache(path, prepared)
    for domain, classes in prepared.missing_classes.items():
        listed = f"{classes}" if len(classes) <= 10 else f"{len(classes)} classes, such as {classes[:10]}"
        warnings.warn(
            f"domain {domain!r} has no examples of class(es) {listed}, which other domains of the study "
            "have; its episodes are drawn from the classes it has.",
            stacklevel=2,
        )
    return prepared


@task(name="prepare", cache_policy=stable_inputs(), persist_result=True, tags=["cpu"])
def prepare_data(data: DataSpec, source: list[str], target: list[str]) -> PreparedData:
    """Prefect task around `prepare`, cached on the data settings and the domains."""
    prepared = prepare(data, source, target)
    get_run_logger().info(
        "%s data (data.modality %s; a spec without a backbone gets %s); %d classes; rows per domain %s; "
        "duplicates dropped %s",
        prepared.modality,
        data.modality,
        MODALITIES[prepared.modality].backbone,
        len(prepared.class_names),
        prepared.rows_per_domain,
        prepared.duplicates_dropped,
    )
    return prepared


def check_episode_shapes(spec: StudySpec, prepared: PreparedData) -> None:
    """Every pool must supply its episodes: enough classes, enough examples per class."""
    ways, queries = spec.episodes.ways, spec.episodes.queries
    for name, pool in prepared.targets.items():
        if pool.episode is not None and pool.support is not None:
            fixed_episodes.check_shape(name, (pool.x, pool.y, pool.episode, pool.support), spec.episodes)
    needs = [
        ("source training pool", prepared.source_train, spec.train_ways, spec.train_shots),
        ("source validation pool", prepared.source_val, ways, spec.train_shots),
        *(
            (f"target domain {name!r}", pool, ways, max(spec.episodes.shots))
            for name, pool in prepared.targets.items()
            if pool.episode is None
        ),
    ]
    problems = [
        f"{what}: {problem}"
        for what, pool, pool_ways, shots in needs
        for problem in episode_shape_problems(pool.y, pool_ways, shots, queries, prepared.class_names)
    ]
    if problems:
        raise StudyError(
            "the data cannot supply the episodes asked for:\n  "
            + "\n  ".join(problems)
            + f"\nAsked: ways={ways} (training ways {spec.train_ways}), shots up to "
            f"{max(spec.episodes.shots)} (training shots {spec.train_shots}), queries={queries}, "
            f"data.val_fraction={spec.data.val_fraction}, "
            f"data.target_unlabelled_fraction={spec.data.target_unlabelled_fraction}. Lower episodes.ways, "
            "train.ways, episodes.shots or episodes.queries (or those fractions), or drop the domain."
        )


def _prepare(
    domains: dict[str, Domain], data: DataSpec, source: list[str], target: list[str], fingerprint: str
) -> PreparedData:
    empty = [name for name, domain in domains.items() if len(domain.table) == 0]
    if empty:
        raise StudyError(
            f"domain(s) {empty} have no rows; check their path, data_files, config or split, "
            "or drop them from source / target"
        )
    modality = _modality(domains, data)
    fixed = {name: _fixed_episodes(name, domains[name], data.fixed_episodes) for name in target}
    # a fixed episode's labels name classes within that episode (as Lake et al.'s run-local class
    # numbers do), so fixed-episode domains keep their own label spaces, apart from the study's
    shared = {name: domain for name, domain in domains.items() if fixed.get(name) is None}
    class_names, labels = _label_space(shared)
    for name in domains.keys() - shared.keys():
        labels.update(_label_space({name: domains[name]})[1])
    kind = modalities.get(modality)
    inputs = {name: _checked_inputs(name, domain, kind, data) for name, domain in domains.items()}
    shapes = {name: tuple(x.shape[1:]) for name, x in inputs.items()}
    if len(set(shapes.values())) > 1:
        raise StudyError(
            f"the domains' {modality} inputs have different shapes: {shapes}. Feature vectors must have one "
            "length; for images of several sizes set data.modality: image (they are then resized)."
        )
    dropped = {}
    for name in domains:
        if fixed.get(name) is not None:
            dropped[name] = 0  # rows are episode members: one input may rightly be in two episodes
            continue
        keep = _first_occurrences(inputs[name])
        dropped[name] = len(labels[name]) - len(keep)
        inputs[name], labels[name] = inputs[name][keep], labels[name][keep]
    source_x = torch.cat([inputs[name] for name in source])
    keep = _first_occurrences(source_x)  # the same input in two source domains is one example
    dropped["source"] = len(source_x) - len(keep)
    source_x, source_y = source_x[keep], torch.cat([labels[name] for name in source])[keep]
    source_domain = torch.cat([torch.full((len(labels[name]),), i) for i, name in enumerate(source)])[keep]
    train, val = split_per_class(source_y, data.val_fraction, data.split_seed)
    normalise = kind.normaliser(source_x[train], data)
    held_out = {name: _unlabelled_split(labels[name], data) for name in target}
    present = {name: set(labels[name].tolist()) for name in shared}
    everywhere = set().union(*present.values())
    return PreparedData(
        source_train=Pool(normalise(source_x[train]), source_y[train], source_domain[train]),
        source_val=Pool(normalise(source_x[val]), source_y[val], source_domain[val]),
        targets={
            name: Pool(
                normalise(inputs[name][kept]), labels[name][kept], None, *(fixed[name] or (None, None))
            )
            for name, (kept, _) in held_out.items()
        },
        target_unlabelled={name: normalise(inputs[name][held]) for name, (_, held) in held_out.items()},
        class_names=class_names,
        fingerprint=fingerprint,
        rows_per_domain={name: len(labels[name]) for name in domains},
        modality=modality,
        duplicates_dropped=dropped,
        missing_classes={
            name: [class_names[c] for c in sorted(everywhere - present[name])]
            for name in target
            if name in shared and everywhere - present[name] and _shares_classes(name, present, source)
        },
    )


def _shares_classes(name: str, present: dict[str, set[int]], source: list[str]) -> bool:
    """Whether target `name` has a class of the source domains: if not, its classes are new by design."""
    return bool(present[name] & set().union(*(present[domain] for domain in source if domain in present)))


def _fixed_episodes(
    name: str, domain: Domain, fixed: FixedEpisodeSpec | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(episode number, is-support) per row of a target domain with fixed episodes; None without."""
    if fixed is None:
        return None
    check_columns(domain.table.column_names, [fixed.episode, fixed.role], f"target domain {name!r}")
    return fixed_episodes.read(name, domain.table, fixed)


def _unlabelled_split(labels: torch.Tensor, data: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(evaluation rows, unlabelled rows) of one target domain; no unlabelled rows by default."""
    if data.target_unlabelled_fraction == 0:
        return torch.arange(len(labels)), torch.arange(0)
    return split_per_class(labels, data.target_unlabelled_fraction, data.split_seed)


def _modality(domains: dict[str, Domain], data: DataSpec) -> str:
    """`data.modality`, or the one the input columns' feature types imply (the same in every domain)."""
    if data.modality != "auto":
        return data.modality
    found = {name: modalities.detect(d.table.features[d.input]) for name, d in domains.items()}
    if len(set(found.values())) > 1:
        raise StudyError(f"the input columns hold different kinds of data per domain: {found}; align them.")
    modality = next(iter(found.values()))
    if modality is None:
        first = next(iter(domains.values()))
        feature = first.table.features[first.input]
        raise StudyError(
            f"cannot tell text, image or feature vectors from the input column's type {feature}; "
            "set data.modality (text, image or features) or data.input."
        )
    return modality


def _label_space(domains: dict[str, Domain]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Class names and each domain's integer labels, aligned by name (ClassLabel, strings) or value.

    Values of one kind only (integers, booleans or strings): 1 and "1" would otherwise be two classes.
    """
    values = {name: _label_values(name, domain) for name, domain in domains.items()}
    kinds = {name: sorted({type(v).__name__ for v in column}) for name, column in values.items()}
    if len({kind for found in kinds.values() for kind in found}) > 1:
        raise StudyError(
            f"the label columns hold values of different kinds: {kinds}. Classes are matched across "
            "domains by value, so 1 and '1' would be two classes: make the labels one kind."
        )
    names = sorted({v for column in values.values() for v in column})
    index = {value: i for i, value in enumerate(names)}
    labels = {
        name: torch.tensor([index[v] for v in column], dtype=torch.long) for name, column in values.items()
    }
    return [str(value) for value in names], labels


def _label_values(name: str, domain: Domain) -> list[int | str]:
    """One domain's labels as ints, bools or strings (ClassLabel as its names, whole floats as ints);
    missing labels, fractional numbers and other types are errors naming the domain."""
    feature = domain.table.features[domain.label]
    column = domain.table.select_columns([domain.label])[:][domain.label]
    is_class_label = isinstance(feature, datasets.ClassLabel)
    missing = sum(
        v is None or (is_class_label and v < 0) or (isinstance(v, float) and math.isnan(v)) for v in column
    )
    where = f"domain {name!r}: label column {domain.label!r}"
    if missing:
        raise StudyError(
            f"{where} has {missing} of {len(column)} rows without a label (null, NaN, or ClassLabel -1); "
            "drop or label those rows"
        )
    if is_class_label:
        return [feature.int2str(v) for v in column]
    other = next((v for v in column if not isinstance(v, int | str | float)), None)
    if other is not None:
        raise StudyError(
            f"{where} holds {type(other).__name__} values such as {other!r}; labels must be integers, "
            "strings or a ClassLabel"
        )
    fractional = next((v for v in column if isinstance(v, float) and not v.is_integer()), None)
    if fractional is not None:
        raise StudyError(
            f"{where} holds fractional numbers such as {fractional}, which look like a measurement, not "
            "a class; labels must be integers, strings or a ClassLabel"
        )
    return [int(v) if isinstance(v, float) else v for v in column]


def _checked_inputs(name: str, domain: Domain, kind: modalities.Modality, data: DataSpec) -> torch.Tensor:
    """One domain's inputs as a tensor; rows without an input, or with NaN or infinite values (which
    would turn every loss they reach into NaN), are errors naming the domain."""
    column = domain.table.select_columns([domain.input]).with_format("arrow")[:][domain.input]
    where = f"domain {name!r}: input column {domain.input!r}"
    if column.null_count:
        raise StudyError(f"{where} has {column.null_count} of {len(column)} rows without an input (null)")
    x = kind.tensor(domain.table.select_columns([domain.input]), domain.input, data)
    bad = int((~torch.isfinite(x.reshape(len(x), -1))).any(1).sum())
    if bad:
        raise StudyError(f"{where} has {bad} of {len(x)} rows with NaN or infinite values; drop or fill them")
    return x


def _first_occurrences(x: torch.Tensor) -> torch.Tensor:
    """Indices of the first row of each distinct input, in order: exact duplicates are dropped."""
    rows = np.ascontiguousarray(x.reshape(len(x), -1).numpy())
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first = np.unique(keys, return_index=True)
    return torch.as_tensor(np.sort(first))


def _fingerprint(domains: dict[str, Domain], data: DataSpec, source: list[str], target: list[str]) -> str:
    """Of the loaded tables, the settings and this code: any change gives a new cache entry."""
    tables = {name: [d.table._fingerprint, d.input, d.label] for name, d in domains.items()}
    settings = json.dumps(
        [tables, data.model_dump(mode="json"), source, target, CODE_VERSION], sort_keys=True, default=str
    )
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def _read_cache(path: Path) -> PreparedData | None:
    """The entry at `path`, or None if there is none or it cannot be read (it is then recomputed).

    weights_only: a cache entry holds tensors and builtins, and nothing in it may run code.
    """
    if not path.is_file():
        return None
    try:
        return _from_state(torch.load(path, weights_only=True))
    except Exception as exc:  # a truncated, corrupt or foreign file: any failure means "recompute"
        warnings.warn(
            f"prepared-data cache entry {path} is unreadable ({type(exc).__name__}: {str(exc)[:200]}); "
            "preparing the data again and replacing it",
            stacklevel=3,
        )
        return None


def _write_cache(path: Path, prepared: PreparedData) -> None:
    """Atomically: a unique temporary file in the same folder, renamed over the entry. Concurrent
    runs of one spec each write their own temporary; the last rename wins with an equal entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp", delete=False
    ) as f:
        temporary = Path(f.name)
    try:
        torch.save(_to_state(prepared), temporary)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def _to_state(prepared: PreparedData) -> dict[str, Any]:
    """Plain tensors and builtins, so the cache loads with torch.load's safe (weights-only) mode."""
    return {
        **vars(prepared),
        "source_train": prepared.source_train.parts(),
        "source_val": prepared.source_val.parts(),
        "targets": {name: pool.parts() for name, pool in prepared.targets.items()},
    }


def _from_state(state: dict[str, Any]) -> PreparedData:
    return PreparedData(
        **{
            **state,
            "source_train": Pool(*state["source_train"]),
            "source_val": Pool(*state["source_val"]),
            "targets": {name: Pool(*parts) for name, parts in state["targets"].items()},
        }
    )
