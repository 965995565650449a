"""The modality extension point: every modality the spec names is registered, auto detection follows the
feature types, and a modality registered outside tasks/ (here) prepares a study with no other change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from adaptflow.errors import StudyError
from adaptflow.spec import MODALITIES, DataSpec, ModalityInfo, Options, applicable_params, load_spec
from metalib import backbones
from tasks import modalities
from tasks.modalities.base import REGISTRY, Modality
from tasks.prepare import prepare
from tests.conftest import DEMO
from tests.test_data_modalities import write


def test_every_modality_of_the_spec_is_registered_with_known_settings_and_backbone() -> None:
    for name, info in MODALITIES.items():
        assert isinstance(modalities.get(name), REGISTRY.get(name))
        assert set(info.settings) <= set(DataSpec.model_fields), name
        assert info.backbone in backbones.names(), name


@pytest.mark.parametrize(
    ("feature", "modality"),
    [
        (datasets.Value("string"), "text"),
        (datasets.Image(), "image"),
        (datasets.Array2D((4, 4), "uint8"), "image"),
        (datasets.List(datasets.List(datasets.Value("uint8"))), "image"),
        (datasets.List(datasets.Value("float32")), "features"),
        (datasets.List({"index": datasets.Value("int32"), "count": datasets.Value("uint8")}), "features"),
        (datasets.Value("int64"), None),
        (datasets.ClassLabel(names=["a", "b"]), None),
    ],
)
def test_auto_detection_asks_each_modality(feature: Any, modality: str | None) -> None:
    assert modalities.detect(feature) == modality


def test_an_unknown_modality_names_the_known_ones() -> None:
    known = "'auto', 'features', 'text' or 'image'"
    with pytest.raises(StudyError, match=f"data.modality: Input should be {known}"):
        load_spec(DEMO, ["data.modality=video"])


@REGISTRY.register("scalar")
class Scalar(Modality):
    """A toy modality: one number per row, as a one-feature vector centred on the source mean."""

    def claims(self, feature: Any) -> bool:
        return isinstance(feature, datasets.Value) and feature.dtype in ("int64", "float64")

    def tensor(self, table: datasets.Dataset, column: str, data: DataSpec) -> torch.Tensor:
        return torch.tensor(table[:][column], dtype=torch.float32).unsqueeze(1)

    def normaliser(self, reference: torch.Tensor, data: DataSpec) -> Any:
        return lambda x: x - reference.mean()


def test_a_modality_registered_outside_tasks_prepares_a_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(MODALITIES, "scalar", ModalityInfo("mlp"))
    rows = {"x": [float(i) for i in range(18)], "label": [i % 3 for i in range(18)], "domain": ["a", "b"] * 9}
    data = {"path": "parquet", "data_files": write(tmp_path, "scalars", rows), "input": "x"}
    for modality in ("auto", "scalar"):  # found from the column's type, or named
        prepared = prepare(DataSpec(**data, modality=modality), ["a"], ["b"], cache=None)
        assert prepared.modality == "scalar" and prepared.input_shape == (1,)
        assert abs(float(prepared.source_train.x.mean())) < 1e-6  # centred on the source training rows
        assert prepared.targets["b"].x[:, 0].diff().eq(2).all()  # target rows 1, 3, ..., 17, moved alike
    raw = {"name": "scalars", "data": {**data, "modality": "scalar"}, "source": ["a"], "target": ["b"],
           "algorithms": [{"name": "protonet"}]}  # fmt: skip
    spec = load_spec(raw)
    assert spec.backbone == Options(name="mlp")  # the row's default backbone
    assert not {"data.image_size", "data.max_tokens", "data.log1p"} & set(applicable_params(spec, "scalar"))
