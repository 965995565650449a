"""Reading a study's domains with Hugging Face `datasets`: paths, columns and domain names checked.

Kept free of torch, Prefect and MLflow, and `datasets` is imported only to load, so that the CLI
checks local paths at once and columns and domain names before it imports the flows
(tasks/prepare.py then makes tensors of the same tables).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adaptflow.errors import StudyError
from adaptflow.spec import DataSpec, DomainSource

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa


# words `datasets` reads as split names in a folder's file names: it then reads only the files they name
SPLIT_WORDS = set("train training validation valid dev val test testing eval evaluation".split())


@dataclass(frozen=True)
class Domain:
    """One domain's rows, with the names of its input and label columns."""

    table: datasets.Dataset
    input: str
    label: str


def load_table(
    path: str,
    data_files: Any = None,
    config: str | None = None,
    split: str | None = None,
    revision: str | None = None,
) -> datasets.Dataset:
    """Rows of one dataset (or one split of it) as one table, whatever splits it was stored in."""
    import datasets

    _check_local_path(path)
    try:
        where, files = _normalised(path, data_files)
        loaded = datasets.load_dataset(where, config, data_files=files, split=split, revision=revision)
    except FileNotFoundError as exc:
        raise StudyError(
            f"data path {path!r} was not found as a local folder, file or hub dataset "
            f"({str(exc).split(' with any supported extension')[0]}). "
            "Check the path, or give data_files."
        ) from None
    except ConnectionError as exc:
        raise StudyError(
            f"data path {path!r} could not be reached ({exc}). It looks like a hub id while "
            "offline: download it once with network access (it is then cached), or point data.path "
            "at a local copy."
        ) from None
    except ValueError as exc:
        raise StudyError(
            f"data path {path!r} ({_source_details(data_files, config, split)}): {exc}"
        ) from None
    except datasets.exceptions.DatasetGenerationError as exc:  # e.g. an empty or damaged file
        raise StudyError(
            f"data path {path!r} ({_source_details(data_files, config, split)}) could not be read: "
            f"{exc.__cause__ or exc}. Is a file empty or damaged?"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        return datasets.concatenate_datasets(list(loaded.values()))
    return loaded


def check_local_paths(data: DataSpec, names: list[str]) -> None:
    """The local paths of the domains `names` exist (a StudyError naming a missing one), checked
    without loading anything. Hub ids and glob patterns are left to `load_table`."""
    sources = data.domain_sources()
    for source in [sources[name] for name in names if name in sources] or [data]:
        _check_local_path(source.path or "")
        if source.path and _files_are_local(source.path):
            _map_files(source.data_files, _check_local_file)


def _normalised(path: str, data_files: Any) -> tuple[str, Any]:
    """`path` and `data_files` with local paths made absolute and normal. `datasets` fingerprints a
    local file by the path as it was spelt, joined to the folder it runs in: `../shared/x.parquet` run
    from two checkouts of the project gave two fingerprints, and so two keys for every cache and search
    built on the data. Files under a local folder `path` stay relative to it; a hub id is left as is."""
    if Path(path).exists():
        return os.path.abspath(path), data_files
    if not _files_are_local(path):  # a hub id: its data_files are paths inside the repository
        return path, data_files
    return path, _map_files(data_files, lambda file: file if "://" in file else os.path.abspath(file))


def _files_are_local(path: str) -> bool:
    """Whether `path` names a packaged builder (parquet, csv, ...), whose data_files are paths relative
    to the folder adaptflow runs in, rather than a local folder or a hub id."""
    return not Path(path).exists() and "/" not in path


def _map_files(files: Any, change: Callable[[str], str]) -> Any:
    """`change` applied to each path of a data_files value: a string, a list, or a mapping of split to
    either."""
    if files is None:
        return None
    if isinstance(files, str):
        return change(files)
    if isinstance(files, dict):
        return {split: _map_files(entry, change) for split, entry in files.items()}
    return [_map_files(str(entry), change) for entry in files]


def _check_local_file(file: str) -> str:
    if "://" not in file and not any(char in file for char in "*?["):  # not a URL or a glob pattern
        _check_local_path(file)
    return file


def _check_local_path(path: str) -> None:
    """A missing path inside a folder that exists here is a local typo, not a hub id: said at once,
    with the folder's entries, instead of after the hub lookup (which offline retries for seconds)."""
    local = Path(path)
    if local.exists() or local.parent == Path(".") or not local.parent.is_dir():
        return
    entries = sorted(entry.name for entry in local.parent.iterdir() if not entry.name.startswith("."))
    listed = entries if len(entries) <= 20 else [*entries[:20], "..."]
    raise StudyError(
        f"data path {path!r} was not found: folder {str(local.parent)!r} exists but has no "
        f"{local.name!r}; it holds {listed}. Paths are relative to the folder adaptflow runs in."
    )


def _source_details(data_files: Any, config: str | None, split: str | None) -> str:
    details = {"data_files": data_files, "config": config, "split": split}
    return (
        ", ".join(f"{key} {value!r}" for key, value in details.items() if value is not None) or "no options"
    )


def load_domains(data: DataSpec, names: list[str]) -> dict[str, Domain]:
    """The study's domains, from `data.domains` (one source each) or from the domain column."""
    if data.domains is not None:
        _check_defined(data, names)
        sources = data.domain_sources()
        return {name: _load_domain(name, sources[name]) for name in names}
    table = load_table(data.path or "", data.data_files, data.config, revision=data.revision)
    check_columns(table.column_names, [data.input, data.label, data.domain], "the dataset")
    # compared as text: spec domains are strings, a column may hold integers (or nulls)
    domains = np.asarray(table.select_columns([data.domain])[:][data.domain]).astype(str)
    _check_present(names, set(domains.tolist()), data.domain)
    return {
        name: Domain(table.select(np.nonzero(domains == name)[0]), data.input, data.label) for name in names
    }


def check_parquet_columns(data: DataSpec, names: list[str]) -> None:
    """What `load_domains` checks (columns, domain names), for data in local Parquet files, read from
    the files' schemas and the domain column with pyarrow alone: a fraction of a second, where
    `datasets` and PyTorch take seconds to import. Other sources (hub ids, patterns, other formats)
    are left to `load_domains`, and so is a file pyarrow cannot read (empty, damaged)."""
    import pyarrow as pa

    try:
        _check_parquet_columns(data, names)
    except (pa.ArrowException, OSError):
        return


def _check_parquet_columns(data: DataSpec, names: list[str]) -> None:
    # ParquetFile, not read_table: that imports pyarrow.dataset, which takes longer than the reading
    from pyarrow.parquet import ParquetFile

    if data.domains is not None:
        _check_defined(data, names)
        sources = data.domain_sources()
        for name in names:
            source = sources[name]
            assert source.input and source.label  # resolved by DataSpec.domain_sources
            for file in _parquet_files(source.path, source.data_files, source.config, source.split):
                have = ParquetFile(file).schema_arrow.names
                check_columns(have, [source.input, source.label], f"domain {name!r}")
        return
    files = [ParquetFile(file) for file in _parquet_files(data.path, data.data_files, data.config)]
    for file in files:
        check_columns(file.schema_arrow.names, [data.input, data.label, data.domain], "the dataset")
    if files and all(_reads_as_text(file.schema_arrow.field(data.domain).type) for file in files):
        columns = [file.read(columns=[data.domain]).column(0).to_pylist() for file in files]
        _check_present(names, {str(value) for values in columns for value in values}, data.domain)


def _parquet_files(
    path: str | None, data_files: Any, config: str | None, split: str | None = None
) -> list[Path]:
    """The local Parquet files `datasets` reads for these settings (a folder's files, but for hidden
    ones and its .md notes), or none where only `datasets` can tell (a hub id, a file given as the path,
    a config or split, a glob pattern, a URL, another format)."""
    if not path or config is not None or split is not None:
        return []
    root = Path(path)
    if data_files is not None and (root.is_dir() or _files_are_local(path)):
        listed: list[str] = []
        _map_files(data_files, lambda file: listed.append(file) or file)
        files = [root / file if root.is_dir() else Path(file) for file in listed]
    elif data_files is None and root.is_dir():
        if any((root / name).exists() for name in ("README.md", ".huggingface.yaml")):
            return []  # it may list the dataset's files itself (a `configs:` section)
        relative = [
            file.relative_to(root)
            for file in sorted(root.rglob("*"))
            if file.is_file() and file.suffix != ".md"
        ]
        relative = [file for file in relative if not any(part.startswith(".") for part in file.parts)]
        if any(_may_be_left_out(file) for file in relative):
            return []
        files = [root / file for file in relative]
    else:
        return []
    return files if files and all(file.suffix == ".parquet" and file.is_file() for file in files) else []


def _may_be_left_out(file: Path) -> bool:
    """Whether `datasets` may leave `file` (relative to its folder) out, or read only some files beside
    it: a name with a split word, or a part starting with an underscore."""
    words = set(re.split(r"[-._ 0-9/]+", file.with_suffix("").as_posix().lower()))
    return bool(words & SPLIT_WORDS) or any(part.startswith("_") for part in file.parts)


def _reads_as_text(kind: pa.DataType) -> bool:
    """Whether `str()` of a value of this column type is what `load_domains` compares (numpy's text of
    it): not for bytes, for one."""
    import pyarrow as pa

    checks = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_boolean)
    return any(check(kind) for check in checks)


def _check_defined(data: DataSpec, names: list[str]) -> None:
    assert data.domains is not None
    unknown = [name for name in names if name not in data.domains]
    if unknown:
        raise StudyError(
            f"domain(s) {unknown} are not defined under data.domains; it defines: {sorted(data.domains)}"
        )


def _check_present(names: list[str], present: set[str], column: str) -> None:
    unknown = [name for name in names if name not in present]
    if unknown:
        listed = sorted(present)
        raise StudyError(f"domain(s) {unknown} not found in column {column!r}; the data has: {listed}")


def _load_domain(name: str, source: DomainSource) -> Domain:
    assert source.path and source.input and source.label  # resolved by DataSpec.domain_sources
    table = load_table(source.path, source.data_files, source.config, source.split, source.revision)
    check_columns(table.column_names, [source.input, source.label], f"domain {name!r}")
    return Domain(table, source.input, source.label)


def check_columns(have: list[str], columns: list[str], where: str) -> None:
    """Raises StudyError naming the `columns` missing from the columns `where` has (`have`), those
    columns, and what to set."""
    missing = [column for column in columns if column not in have]
    if missing:
        raise StudyError(
            f"column(s) {missing} not in {where}; its columns are {have}. "
            "Set data.input / data.label / data.domain (or input / label under data.domains) "
            "to the right names."
        )
