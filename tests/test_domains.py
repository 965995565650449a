"""Domains however the data defines them (a column, one dataset per domain, configs, splits), labels
aligned by class name, the missing-class report, duplicate removal and the prepared-data cache.
All through real `datasets` loading of files written here, offline."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from adaptflow.errors import StudyError
from adaptflow.spec import DataSpec
from metalib import EpisodeSampler
from tasks.prepare import PreparedData, prepare
from tests.test_data_modalities import write
from tests.test_fixed_episodes import BACKGROUND

SENTIMENT = datasets.ClassLabel(names=["negative", "positive"])


def reviews(domain: str, n: int = 12, label_of: Any = lambda i: i % 2) -> dict[str, list]:
    """n distinct short reviews of one product type, labels by `label_of(i)`."""
    return {
        "text": [f"{domain} review number {i} {'great' if label_of(i) else 'poor'}" for i in range(n)],
        "label": [label_of(i) for i in range(n)],
        "domain": [domain] * n,
    }


def prepare_spec(
    source: list[str], target: list[str], cache: Path | None = None, **data: Any
) -> PreparedData:
    return prepare(DataSpec(**data), source, target, cache=cache)


def test_domains_from_a_column(tmp_path: Path) -> None:
    files = [write(tmp_path, name, reviews(name)) for name in ("books", "dvd", "kitchen")]
    prepared = prepare_spec(["books", "dvd"], ["kitchen"], path="parquet", data_files=files, input="text")
    assert prepared.rows_per_domain == {"books": 12, "dvd": 12, "kitchen": 12}
    assert len(prepared.source_train) + len(prepared.source_val) == 24
    with pytest.raises(StudyError, match=r"\['toys'\] not found in column 'domain'"):
        prepare_spec(["books"], ["toys"], path="parquet", data_files=files, input="text")


def test_one_dataset_per_domain_with_its_own_column_names(tmp_path: Path) -> None:
    books = write(tmp_path / "b", "books", reviews("books"))
    renamed = reviews("dvd")
    dvd = write(tmp_path / "d", "dvd", {"review": renamed["text"], "stars": renamed["label"]})
    domains = {
        "books": {"path": "parquet", "data_files": books},
        "dvd": {"path": "parquet", "data_files": dvd, "input": "review", "label": "stars"},
    }
    prepared = prepare_spec(["books"], ["dvd"], domains=domains, input="text")
    assert prepared.rows_per_domain == {"books": 12, "dvd": 12}
    assert prepared.targets["dvd"].x.shape == (12, 256)
    with pytest.raises(StudyError, match=r"\['toys'\] are not defined under data.domains"):
        prepare_spec(["books"], ["toys"], domains=domains, input="text")
    with pytest.raises(StudyError, match=r"\['review'\] not in domain 'books'"):
        prepare_spec(["books"], ["dvd"], domains=domains, input="review")


def test_domains_as_configs_and_as_splits_of_one_dataset(tmp_path: Path) -> None:
    """A local dataset folder whose README declares one config per product type, each with two splits."""
    folder = tmp_path / "reviews"
    for name in ("books", "dvd"):
        write(folder, f"{name}-train", reviews(name))
        write(folder, f"{name}-test", reviews(f"{name} extra"))
    configs = "".join(
        f"- config_name: {name}\n  data_files:\n"
        f"  - {{split: train, path: {name}-train.parquet}}\n  - {{split: test, path: {name}-test.parquet}}\n"
        for name in ("books", "dvd")
    )
    (folder / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    per_config = {"books": {"config": "books"}, "dvd": {"config": "dvd"}}
    by_config = prepare_spec(["books"], ["dvd"], path=str(folder), domains=per_config, input="text")
    assert by_config.rows_per_domain == {"books": 24, "dvd": 24}  # every split of the config
    per_split = {"old": {"split": "train"}, "new": {"split": "test"}}
    by_split = prepare_spec(
        ["old"], ["new"], path=str(folder), config="books", domains=per_split, input="text"
    )
    assert by_split.rows_per_domain == {"old": 12, "new": 12}
    per_split["new"]["split"] = "validation"
    with pytest.raises(StudyError, match="split 'validation'"):
        prepare_spec(["old"], ["new"], path=str(folder), config="books", domains=per_split, input="text")


def test_labels_are_aligned_by_class_name_across_domains(tmp_path: Path) -> None:
    """ClassLabel ids in one order, ClassLabel ids in the other order and plain strings: one label space."""
    features = datasets.Features({"text": datasets.Value("string"), "label": SENTIMENT})
    flipped = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["positive", "negative"])}
    )

    def rows(domain: str, label_id: Any) -> dict:
        data = reviews(domain)
        return {"text": data["text"], "label": [label_id(v) for v in data["label"]]}

    domains = {
        "a": {"path": "parquet", "data_files": write(tmp_path, "a", rows("a", lambda v: v), features)},
        "b": {"path": "parquet", "data_files": write(tmp_path, "b", rows("b", lambda v: 1 - v), flipped)},
        "c": {"path": "parquet", "data_files": write(tmp_path, "c", rows("c", lambda v: SENTIMENT.names[v]))},
    }
    prepared = prepare_spec(["a"], ["b", "c"], domains=domains, input="text")
    assert prepared.class_names == ["negative", "positive"]
    for name in ("b", "c"):  # review i says 'great' exactly when it is positive, in every domain
        assert prepared.targets[name].y.tolist() == [i % 2 for i in range(12)]


def test_a_class_missing_from_a_domain_is_reported_by_name(tmp_path: Path) -> None:
    three = reviews("books", n=12, label_of=lambda i: ["negative", "neutral", "positive"][i % 3])
    two = reviews("dvd", n=12, label_of=lambda i: ["negative", "positive"][i % 2])
    files = [write(tmp_path, "books", three), write(tmp_path, "dvd", two)]
    with pytest.warns(UserWarning, match=r"domain 'dvd' has no examples of class\(es\) \['neutral'\]"):
        prepared = prepare_spec(["books"], ["dvd"], path="parquet", data_files=files, input="text")
    assert prepared.class_names == ["negative", "neutral", "positive"]
    assert prepared.missing_classes == {"dvd": ["neutral"]}


def test_a_target_of_new_classes_only_is_no_missing_class(tmp_path: Path) -> None:
    """Held-out Omniglot alphabets: the target's characters are not the source's, by design."""
    alphabets = {
        name: {"path": "parquet", "data_files": str(BACKGROUND / f"{name}.parquet")}
        for name in ("Tagalog", "Early_Aramaic")
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*has no examples of class")
        prepared = prepare_spec(
            ["Tagalog"], ["Early_Aramaic"], domains=alphabets, input="pixels", modality="image", channels=1
        )
    assert prepared.missing_classes == {}
    assert not set(prepared.targets["Early_Aramaic"].y.tolist()) & set(prepared.source_train.y.tolist())


def test_duplicate_inputs_are_dropped_so_support_and_query_never_share_one(tmp_path: Path) -> None:
    base, toys = reviews("books", n=8), reviews("toys", n=8)
    repeat = reviews("dvd", n=8)
    repeat["text"] = repeat["text"][:4] + base["text"][:4]  # dvd repeats four books reviews
    files = [
        write(tmp_path, "books", {key: values * 3 for key, values in base.items()}),  # each review 3 times
        write(tmp_path, "dvd", repeat),
        write(tmp_path, "toys", {key: values * 3 for key, values in toys.items()}),
    ]
    prepared = prepare_spec(
        ["books", "dvd"], ["toys"], path="parquet", data_files=files, input="text", val_fraction=0.25
    )
    assert prepared.rows_per_domain == {"books": 8, "dvd": 8, "toys": 8}
    assert prepared.duplicates_dropped == {"books": 16, "dvd": 0, "toys": 16, "source": 4}
    assert len(prepared.source_train) + len(prepared.source_val) == 12
    pool = prepared.targets["toys"]
    batch = EpisodeSampler(pool.x, pool.y, ways=2, shots=1, queries=3, seed=0).sample(20)
    for t in range(batch.num_tasks):
        support = {tuple(row.tolist()) for row in batch.support_x[t]}
        query = {tuple(row.tolist()) for row in batch.query_x[t]}
        assert not support & query


def test_prepared_data_is_cached_on_the_fingerprint_and_the_settings(tmp_path: Path) -> None:
    files = [write(tmp_path, name, reviews(name)) for name in ("books", "dvd")]
    settings = {"path": "parquet", "data_files": files, "input": "text"}
    cache = tmp_path / "cache"
    first = prepare_spec(["books"], ["dvd"], cache=cache, **settings)
    entry = cache / f"{first.fingerprint}.pt"
    assert [path.name for path in cache.iterdir()] == [entry.name]

    # a second preparation reads the entry back: mark it, and the mark comes back
    state = torch.load(entry, weights_only=True)
    state["rows_per_domain"] = {"books": -1, "dvd": -1}
    torch.save(state, entry)
    again = prepare_spec(["books"], ["dvd"], cache=cache, **settings)
    assert again.rows_per_domain == {"books": -1, "dvd": -1}
    assert torch.equal(again.targets["dvd"].x, first.targets["dvd"].x)

    # other settings, or changed data, make a new entry
    shorter = prepare_spec(["books"], ["dvd"], cache=cache, **{**settings, "max_tokens": 8})
    write(tmp_path, "dvd", reviews("dvd", n=14))
    changed = prepare_spec(["books"], ["dvd"], cache=cache, **settings)
    assert len({first.fingerprint, shorter.fingerprint, changed.fingerprint}) == 3
    assert changed.rows_per_domain == {"books": 12, "dvd": 14}


def test_the_fingerprint_does_not_depend_on_the_folder_a_relative_path_is_read_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One spec naming `../books.parquet`, run from two checkouts side by side, reads the same files:
    one fingerprint, so one cache entry and one search key (before, `datasets` fingerprinted the path
    as joined, `/a/checkout1/../books.parquet`, and every cache missed in the other checkout)."""
    for name in ("books", "dvd"):
        write(tmp_path, name, reviews(name))
    fingerprints = set()
    for checkout in ("checkout1", "checkout2"):
        (tmp_path / checkout).mkdir()
        monkeypatch.chdir(tmp_path / checkout)
        files = ["../books.parquet", "../dvd.parquet"]
        prepared = prepare_spec(["books"], ["dvd"], path="parquet", data_files=files, input="text")
        fingerprints.add(prepared.fingerprint)
    assert len(fingerprints) == 1


def test_data_needs_a_path_somewhere() -> None:
    with pytest.raises(ValueError, match="give data.path, or a path for every domain"):
        DataSpec(domains={"a": {"split": "train"}, "b": {"path": "parquet"}})
