"""The study spec: one YAML file that says which data, domains, algorithms, shots and seeds.

Validated with pydantic; unknown keys are errors, and every error names the key and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adaptflow.errors import StudyError
from metalib import algorithms, backbones


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(Strict):
    path: str = Field(description="anything datasets.load_dataset accepts: hub id, local folder, builder")
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    revision: str | None = None
    input: str = "features"
    label: str = "label"
    domain: str = "domain"
    log1p: bool = False  # log(1 + x) before standardising (counts, histograms)
    val_fraction: float = Field(0.2, gt=0, lt=1)  # of each source domain, for model selection
    split_seed: int = 0


class EpisodeSpec(Strict):
    ways: int = Field(5, ge=2)
    shots: list[int] = [1, 5]
    queries: int = Field(15, ge=1)
    eval_episodes: int = Field(600, ge=1)

    @field_validator("shots", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @field_validator("shots")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 1:
            raise ValueError("shots must be a non-empty list of positive integers")
        return sorted(set(value))


class Options(BaseModel):
    """A named component with its own options (checked against the component, not here)."""

    model_config = ConfigDict(extra="allow")
    name: str

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainSpec(Strict):
    steps: int = Field(500, ge=0)
    meta_batch: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    shots: int | None = Field(None, ge=1)  # training shots; default: the largest of episodes.shots
    val_every: int = Field(50, ge=1)
    val_episodes: int = Field(100, ge=1)


class StudySpec(Strict):
    name: str = Field(min_length=1)
    data: DataSpec
    source: list[str] = Field(min_length=1)
    target: list[str] = Field(min_length=1)
    episodes: EpisodeSpec = EpisodeSpec()
    backbone: Options = Options(name="mlp")
    algorithms: list[Options] = Field(min_length=1)
    train: TrainSpec = TrainSpec()
    seeds: list[int] = Field([0], min_length=1)

    @model_validator(mode="after")
    def _disjoint_domains(self) -> StudySpec:
        both = sorted(set(self.source) & set(self.target))
        if both:
            raise ValueError(f"domains {both} are both source and target; a target must be unseen")
        return self

    @model_validator(mode="after")
    def _known_components(self) -> StudySpec:
        """Algorithm names and hyperparameters, and the backbone name, are checked at load time."""
        try:
            backbones.REGISTRY.get(self.backbone.name)
            for algorithm in self.algorithms:
                algorithms.make_hparams(algorithm.name, algorithm.options())
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        except TypeError as exc:
            raise ValueError(f"bad hyperparameter value: {exc}") from None
        return self

    @property
    def train_shots(self) -> int:
        return self.train.shots or max(self.episodes.shots)


def load_spec(source: str | Path | dict[str, Any], overrides: Iterable[str] = ()) -> StudySpec:
    """Reads a spec from a YAML path or a dict, applies `key.path=value` overrides, validates."""
    if isinstance(source, dict):
        raw, where = source, "spec"
    else:
        raw, where = _read_yaml(Path(source)), str(source)
    for item in overrides:
        _apply_override(raw, item)
    return parse_spec(raw, where)


def parse_spec(raw: dict[str, Any], where: str = "spec") -> StudySpec:
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as exc:
        raise StudyError(f"{where} is not a valid study spec:\n" + _explain(exc)) from None


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts to dotted keys with string values (MLflow params)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        flat = {}
        for index, item in enumerate(value):
            flat.update(flatten(item, f"{prefix}{index}."))
        return flat
    return {prefix.rstrip("."): str(value)}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise StudyError(f"spec file {path} not found; pass the path of a YAML study spec (see studies/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StudyError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise StudyError(
            f"{path} must hold a YAML mapping (name:, data:, source:, ...), not {type(raw).__name__}"
        )
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Sets raw[a][b]... from 'a.b=value'; list items are addressed by index ('algorithms.0.lr')."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise StudyError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.steps=50")
    value = yaml.safe_load(text)
    *parents, last = key.split(".")
    node: Any = raw
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _explain(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = f"unknown key; allowed here: {', '.join(_allowed_keys(error['loc']))}"
        elif error["type"] == "missing":
            message = "required key is missing"
        lines.append(f"  {location}: {message}")
    return "\n".join(lines)


def _allowed_keys(location: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = StudySpec
    for part in location[:-1]:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[str(part)].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return list(model.model_fields)
