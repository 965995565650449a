"""The study spec: one YAML file that says which data, domains, algorithms, shots and seeds.

Validated with pydantic; unknown keys are errors, and every error names the key and the fix.
metalib (and so PyTorch) is imported only by the checks that need its registries, so a missing file,
bad YAML or a mistyped key is reported without waiting for PyTorch to load.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from adaptflow.errors import StudyError

if TYPE_CHECKING:
    from metalib.search_space import SearchSpace


@functools.cache
def registered_names(package: str) -> list[str]:
    """The names registered in metalib/<package> (`algorithms`, `backbones`), read from the source
    files rather than imported, so that a mistyped name is reported without waiting for PyTorch.
    tests/test_bad_input.py checks that they are the imported registries' names."""
    folder = Path(importlib.util.find_spec("metalib").submodule_search_locations[0]) / package
    pattern = re.compile(r'REGISTRY\.register\("(\w+)"\)')
    return sorted(name for path in folder.glob("*.py") for name in pattern.findall(path.read_text()))


def _check_registered(kind: str, package: str, name: str) -> None:
    known = registered_names(package)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {kind} {name!r}{hint}; known: {', '.join(known)}")


@dataclass(frozen=True)
class ModalityInfo:
    """What the spec knows of a modality; tasks/modalities/<name>.py turns its data into tensors."""

    backbone: str  # the default backbone for data of this modality
    settings: tuple[str, ...] = ()  # `data` keys only it reads; runs log those of the data's modality


# The one list of modalities: `data.modality` accepts these names (and auto). It lives here, not with
# the code that prepares each modality, because a spec is checked before PyTorch and `datasets` load.
MODALITIES: dict[str, ModalityInfo] = {
    "features": ModalityInfo("mlp", ("log1p", "num_features")),
    "text": ModalityInfo("text_bag", ("max_tokens", "ngrams", "tokenizer")),
    "image": ModalityInfo("conv4", ("image_size", "channels")),
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DomainSource(Strict):
    """One domain loaded on its own: a dataset, a config or a split, with its own column names.

    Unset keys fall back to the `data` section's values.
    """

    path: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None  # with path: not inherited
    config: str | None = None
    split: str | None = None  # default: every split of the dataset
    revision: str | None = None
    input: str | None = None
    label: str | None = None


class FixedEpisodeSpec(Strict):
    """Target episodes defined by the data, as published benchmarks fix their test episodes: a column
    names each row's episode, another says whether the row is in its support set or among its queries.

    Every target domain is then evaluated on exactly its fixed episodes (all of them, in order), and
    `episodes.ways` / `episodes.shots` must match their shape.
    """

    episode: str  # column naming each row's episode (any values; episodes run in sorted order)
    role: str = "role"  # column saying support or query
    support: str = "support"  # the role column's value for support rows
    query: str = "query"  # the role column's value for query rows


class DataSpec(Strict):
    path: str | None = Field(None, description="anything datasets.load_dataset accepts: hub id, local folder")
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    config: str | None = None  # dataset configuration name (load_dataset's `name`)
    revision: str | None = None
    input: str = "features"
    label: str = "label"
    domain: str = "domain"  # column naming each row's domain; unused when `domains` is given
    domains: dict[str, DomainSource] | None = None  # one dataset, config or split per domain
    modality: str = "auto"  # a name in MODALITIES, or auto: from the input column's feature type
    image_size: int = Field(28, ge=4)  # images are resized to image_size x image_size
    channels: Literal[1, 3] = 3  # images are converted to grayscale (1) or RGB (3)
    max_tokens: int = Field(256, ge=1)  # text: hashed n-grams kept per example
    ngrams: int = Field(2, ge=1, le=4)  # text: word n-grams up to this length
    # text: token ids from this Hugging Face tokenizer (hub id or local path) instead of hashed n-grams;
    # filled in from backbone.model when the backbone is hf_encoder
    tokenizer: str | None = None
    log1p: bool = False  # feature vectors: log(1 + x) before standardising (counts, histograms)
    num_features: int | None = Field(None, ge=1)  # sparse feature vectors: length of the dense vector
    val_fraction: float = Field(0.2, gt=0, lt=1)  # of each source domain, for model selection
    split_seed: int = 0
    # of each target domain, held out (stratified) as unlabelled rows for learners that adapt without
    # labels (dann); those rows are never evaluated on, for any algorithm
    target_unlabelled_fraction: float = Field(0.0, ge=0, lt=1)
    fixed_episodes: FixedEpisodeSpec | None = None  # default: target episodes drawn at random (seeded)

    @field_validator("modality", mode="before")
    @classmethod
    def _known_modality(cls, value: Any) -> Any:
        """Read from MODALITIES when checked, so a modality added at run time is accepted too."""
        names = ("auto", *MODALITIES)
        if value not in names:
            *first, last = map(repr, names)
            raise ValueError(f"Input should be {', '.join(first)} or {last}")
        return value

    @model_validator(mode="after")
    def _has_a_source(self) -> DataSpec:
        if self.path is None and not (self.domains and all(d.path for d in self.domains.values())):
            raise ValueError("give data.path, or a path for every domain under data.domains")
        if self.fixed_episodes is not None and self.target_unlabelled_fraction:
            raise ValueError(
                "data.target_unlabelled_fraction cannot hold rows out of fixed episodes; set it to 0, or "
                "drop data.fixed_episodes"
            )
        return self

    def domain_sources(self) -> dict[str, DomainSource]:
        """Each domain's source with every key resolved against the `data` section."""
        return {
            name: DomainSource(
                path=d.path or self.path,
                data_files=d.data_files if d.path else (d.data_files or self.data_files),
                config=d.config or self.config,
                split=d.split,
                revision=d.revision or self.revision,
                input=d.input or self.input,
                label=d.label or self.label,
            )
            for name, d in (self.domains or {}).items()
        }


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
    label: str | None = None  # how results name it; tells apart two entries of one algorithm

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def display_name(self) -> str:
        return self.label or self.name


class TrainSpec(Strict):
    steps: int = Field(500, ge=0)
    meta_batch: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    shots: int | None = Field(None, ge=1)  # training shots; default: the largest of episodes.shots
    ways: int | None = Field(None, ge=2)  # training ways; default: episodes.ways (more: see fixed_ways)
    val_every: int = Field(50, ge=1)
    val_episodes: int = Field(100, ge=1)
    # steps between checkpoints, besides the one after each validation (a checkpoint of the demo's model
    # is 3.8 MB: weights, Adam's moments, best weights), and at least this many seconds between two: a
    # killed training loses at most about checkpoint_seconds plus the steps to the next validation or
    # checkpoint_every step
    checkpoint_every: int = Field(100, ge=1)
    checkpoint_seconds: float = Field(30.0, ge=0)


class SearchSpec(Strict):
    """A hyperparameter search per algorithm, on source data only, with one budget for all.

    Each algorithm's default space (its SEARCH_SPACE in metalib) is searched, less the keys its entry
    sets (those stay fixed); `space` replaces or adds ranges per algorithm label.
    """

    trials: int = Field(ge=1)  # per algorithm; raising it later continues the same search
    sampler: Literal["tpe", "random"] = "tpe"  # random: DomainBed's protocol
    pruner: Literal["median", "none"] = "median"  # stops trials below the median validation curve
    # source_validation: the source validation episodes; leave_one_source_out: each source domain in
    # turn is a pseudo-target (train on the others, few-shot episodes on it); the target is never read
    selection: Literal["source_validation", "leave_one_source_out"] = "source_validation"
    seed: int = 0  # of the sampler and of every trial's training
    space: dict[str, dict[str, Any]] = {}  # algorithm label -> {hyperparameter: {low, high, log} | {choices}}
    # Optuna storage URL; default: sqlite optuna.db next to the MLflow store (docs/search.md)
    storage: str | None = None


class StudySpec(Strict):
    name: str = Field(min_length=1)
    data: DataSpec
    source: list[str] = Field(min_length=1)
    target: list[str] = Field(min_length=1)
    episodes: EpisodeSpec = EpisodeSpec()
    backbone: Options | None = None  # default: by modality (features: mlp, text: text_bag, image: conv4)
    algorithms: list[Options] = Field(min_length=1)
    train: TrainSpec = TrainSpec()
    seeds: list[int] = Field([0], min_length=1)
    search: SearchSpec | None = None  # default: every algorithm runs on its entry's hyperparameters

    @model_validator(mode="after")
    def _disjoint_domains(self) -> StudySpec:
        both = sorted(set(self.source) & set(self.target))
        if both:
            raise ValueError(f"domains {both} are both source and target; a target must be unseen")
        return self

    @model_validator(mode="after")
    def _default_backbone(self) -> StudySpec:
        """With the modality given, the default backbone is known (and logged) from the spec alone."""
        if self.backbone is None and self.data.modality != "auto":
            self.backbone = Options(name=MODALITIES[self.data.modality].backbone)
        return self

    @model_validator(mode="after")
    def _tokenizer_of_backbone(self) -> StudySpec:
        """A pretrained text encoder reads the token ids of its own tokenizer, made once in prepare."""
        if self.backbone is None or self.backbone.name != "hf_encoder":
            return self
        model = self.backbone.options().get("model")
        if not isinstance(model, str):
            raise ValueError("backbone hf_encoder needs `model`: a Hugging Face hub id or a local folder")
        if self.data.tokenizer not in (None, model):
            raise ValueError(
                f"data.tokenizer {self.data.tokenizer!r} is not the hf_encoder's model {model!r}; "
                "leave data.tokenizer out (it follows the model)"
            )
        self.data.tokenizer = model
        return self

    @model_validator(mode="after")
    def _training_episode_shape(self) -> StudySpec:
        """Training shots and ways default from the evaluation episodes. Resolved here, so MLflow
        params and cache keys carry the values used, and stating a default changes nothing."""
        self.train.shots = self.train.shots or max(self.episodes.shots)
        self.train.ways = self.train.ways or self.episodes.ways
        return self

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, entries: list[Options]) -> list[Options]:
        for entry in entries:
            _check_registered("algorithm", "algorithms", entry.name)
        return entries

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, entry: Options | None) -> Options | None:
        if entry is not None:
            _check_registered("backbone", "backbones", entry.name)
        return entry

    @model_validator(mode="after")
    def _known_components(self, info: ValidationInfo) -> StudySpec:
        """Algorithm hyperparameters are checked at load time (their names were checked above), unless
        the context says `components: False`: a first pass that leaves PyTorch unloaded."""
        if not _checks_components(info):
            return self
        from metalib import algorithms

        try:
            for algorithm in self.algorithms:
                algorithms.make_hparams(algorithm.name, algorithm.options())
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        except TypeError as exc:
            raise ValueError(f"bad hyperparameter value: {exc}") from None
        unsupervised = [
            a.name for a in self.algorithms if algorithms.REGISTRY.get(a.name).uses_unlabelled_target
        ]
        if unsupervised and self.data.target_unlabelled_fraction == 0:
            raise ValueError(
                f"{sorted(set(unsupervised))} train on unlabelled target rows: set "
                "data.target_unlabelled_fraction (e.g. 0.3) to hold that share of each target domain out "
                "of evaluation for them"
            )
        fixed = [a.name for a in self.algorithms if algorithms.REGISTRY.get(a.name).fixed_ways]
        if self.train_ways != self.episodes.ways and fixed:
            flexible = [
                name for name in algorithms.REGISTRY.names() if not algorithms.REGISTRY.get(name).fixed_ways
            ]
            raise ValueError(
                f"train.ways={self.train_ways} differs from episodes.ways={self.episodes.ways}, but "
                f"{sorted(set(fixed))} have parameters sized for episodes.ways classes; drop train.ways or "
                f"those algorithms (any train.ways suits {', '.join(flexible)})"
            )
        names = [algorithm.display_name for algorithm in self.algorithms]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"algorithms {repeated} appear more than once; give each entry a distinct `label`, "
                "e.g. {name: maml, label: fomaml, first_order: true}"
            )
        return self

    @model_validator(mode="after")
    def _search_space(self, info: ValidationInfo) -> StudySpec:
        """Every range names an algorithm of the study and one of its hyperparameters."""
        if self.search is None or not _checks_components(info):
            return self
        from metalib import algorithms
        from metalib.search_space import parse_range

        if self.search.selection == "leave_one_source_out" and len(self.source) < 2:
            raise ValueError(
                "search.selection leave_one_source_out needs 2 or more source domains; with one, use "
                "source_validation"
            )
        labels = {algorithm.display_name: algorithm for algorithm in self.algorithms}
        for label, ranges in self.search.space.items():
            if label not in labels:
                raise ValueError(
                    f"search.space.{label}: no algorithm is labelled {label!r}; known: {sorted(labels)}"
                )
            entry = labels[label]
            known = sorted(asdict(algorithms.make_hparams(entry.name, {})))
            for key, value in ranges.items():
                where = f"search.space.{label}.{key}"
                if key not in known:
                    raise ValueError(f"{where}: {entry.name} has no hyperparameter {key!r}; known: {known}")
                if key in entry.options():
                    raise ValueError(f"{where}: the algorithm entry fixes {key}; drop it there or here")
                try:
                    parse_range(value)
                except ValueError as exc:
                    raise ValueError(f"{where}: {exc}") from None
        return self

    def search_space(self, algorithm: Options) -> SearchSpace:
        """The ranges searched for one algorithm entry: its default space with the spec's ranges, less
        the hyperparameters the entry fixes. Empty without a search."""
        if self.search is None:
            return {}
        from metalib import algorithms
        from metalib.search_space import parse_range

        space = {
            **algorithms.search_space(algorithm.name),
            **{
                key: parse_range(value)
                for key, value in self.search.space.get(algorithm.display_name, {}).items()
            },
        }
        return {key: value for key, value in space.items() if key not in algorithm.options()}

    def protocol(self) -> str:
        """The evaluation protocol in words, for table captions."""
        fixed = self.data.fixed_episodes
        if fixed is not None:
            episodes = f"the fixed target episodes of column {fixed.episode!r}"
        else:
            episodes = f"{self.episodes.queries} queries, {self.episodes.eval_episodes} target episodes"
        return f"{self.episodes.ways}-way, {episodes} per seed, seeds {self.seeds}"

    @property
    def train_shots(self) -> int:
        return self.train.shots or max(self.episodes.shots)

    @property
    def train_ways(self) -> int:
        return self.train.ways or self.episodes.ways

    def backbone_for(self, modality: str) -> Options:
        """The spec's backbone, or the default for the modality the data turned out to have."""
        return self.backbone or Options(name=MODALITIES[modality].backbone)


def _checks_components(info: ValidationInfo) -> bool:
    """False in a validation whose context asks to leave the metalib checks (PyTorch) for later."""
    return bool((info.context or {}).get("components", True))


def load_spec(
    source: str | Path | dict[str, Any], overrides: Iterable[str] = (), *, components: bool = True
) -> StudySpec:
    """Reads a spec from a YAML path or a dict, applies `key.path=value` overrides, validates; with
    `components=False`, all but the algorithms' hyperparameters, which need PyTorch."""
    if isinstance(source, dict):
        raw, where = source, "spec"
    else:
        raw, where = _read_yaml(Path(source)), str(source)
    overrides = list(overrides)
    for item in overrides:
        _apply_override(raw, item)
    if overrides:
        where += " with " + " ".join(f"--set {item}" for item in overrides)
    return parse_spec(raw, where, overrides, components=components)


def parse_spec(
    raw: dict[str, Any], where: str = "spec", overrides: Iterable[str] = (), *, components: bool = True
) -> StudySpec:
    """The validated spec; a StudyError lists every problem, naming the --set that caused it if any."""
    try:
        return StudySpec.model_validate(raw, context={"components": components})
    except ValidationError as exc:
        raise StudyError(f"{where} is not a valid study spec:\n" + _explain(exc, list(overrides))) from None


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


def applicable_params(spec: StudySpec, modality: str, one_algorithm: bool = False) -> dict[str, str]:
    """The spec as MLflow params, less what does not apply: unset values, `data` settings of other
    modalities than the data's, and with `one_algorithm` (an evaluation's run, which logs its own
    resolved `hparams.*`) the `algorithms.*` entries."""
    other = {f"data.{key}" for name, info in MODALITIES.items() if name != modality for key in info.settings}
    return {
        key: value
        for key, value in flatten(spec).items()
        if value != "None" and key not in other and not (one_algorithm and key.startswith("algorithms."))
    }


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
    """Sets raw[a][b]... from 'a.b=value'; list items are addressed by index ('algorithms.0.lr').

    Missing (or null) mappings on the way are created; anything else that does not fit the spec's
    shape is a StudyError naming the override.
    """
    key, sep, text = item.partition("=")
    parts = key.split(".")
    if not sep or not all(parts):
        raise StudyError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.steps=50")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc
        raise StudyError(
            f"--set {item!r}: the value {text!r} is not valid YAML ({problem}); a plain string with "
            f"YAML syntax in it must be quoted, e.g. {key}='\"...\"'"
        ) from None
    node: Any = raw
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the spec"
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdecimal() or int(part) >= len(node):
                indices = f"0..{len(node) - 1}" if node else "none: it is empty"
                raise StudyError(
                    f"--set {item!r}: {where} is a list of {len(node)} item(s); address an item by its "
                    f"index ({indices}), or set the whole list, e.g. {where}=[...]"
                )
            part = int(part)
        elif isinstance(node, dict):
            if not last and node.get(part) is None:
                node[part] = {}
        else:
            raise StudyError(
                f"--set {item!r}: {where} is {node!r}, not a mapping or a list, so it has no {part!r}; "
                f"set {where} itself, or check the key path"
            )
        if last:
            node[part] = value
        else:
            node = node[part]


def _explain(exc: ValidationError, overrides: list[str]) -> str:
    lines = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown key; allowed here: {', '.join(_allowed_keys(error['loc']))}"
        elif error["type"] == "missing":
            message = "required key is missing"
        culprits = [item for item in overrides if _within(location, item.partition("=")[0])]
        if culprits:
            message += f" (from --set {', '.join(culprits)})"
        lines.append(f"  {location}: {message}")
    return "\n".join(lines)


def _within(location: str, key: str) -> bool:
    """Whether an error at `location` lies in what an override of `key` set (or holds that key)."""
    return any(
        inner == outer or inner.startswith(outer + ".") for inner, outer in ((location, key), (key, location))
    )


def _allowed_keys(location: tuple[Any, ...]) -> list[str]:
    """The keys of the section at `location`, following fields into their models (list items and
    dict values too, as for data.domains.<name>)."""
    model: type[BaseModel] = StudySpec
    for part in location[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is not None:
            model = _model_in(field.annotation) or model
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `Options | None` or `dict[str, DomainSource]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((model for arg in get_args(annotation) if (model := _model_in(arg))), None)
