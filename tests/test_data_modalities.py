"""Each modality through real `datasets` loading (Parquet files written here, read offline):
images (Image feature and pixel arrays, mixed sizes and modes), text, feature vectors, the
modality override and the default backbone per modality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from adaptflow.cli import main
from adaptflow.errors import StudyError
from adaptflow.spec import DataSpec, Options, load_spec
from tasks.prepare import PreparedData, prepare
from tasks.train import LearnerSetup
from tests.conftest import DEMO, cli_overrides


def write(folder: Path, name: str, rows: dict[str, list], features: datasets.Features | None = None) -> str:
    """One Parquet file written through `datasets`, so feature types (Image, ClassLabel) are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return str(path)


def prepare_files(files: list[str], source: list[str], target: list[str], **data: Any) -> PreparedData:
    spec = DataSpec(path="parquet", data_files={"train": files}, **data)
    return prepare(spec, source, target, cache=None)


def image_rows(domain: str, mode: str, size: tuple[int, int], classes: int = 2, per_class: int = 4) -> dict:
    """Solid images whose brightness is set by class and index, so every image differs."""
    images, labels = [], []
    for label in range(classes):
        for i in range(per_class):
            level = 40 + 100 * label + 10 * i
            colour = level if mode in ("L", "P") else (level,) * len(mode)
            images.append(Image.new(mode, size, colour))
            labels.append(label)
    return {"image": images, "label": labels, "domain": [domain] * len(labels)}


IMAGE = datasets.Features(
    {"image": datasets.Image(), "label": datasets.Value("int64"), "domain": datasets.Value("string")}
)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_feature_of_mixed_sizes_and_modes_becomes_one_tensor_shape(
    tmp_path: Path, channels: int
) -> None:
    files = [
        write(tmp_path, "gray", image_rows("gray", "L", (12, 10)), IMAGE),
        write(tmp_path, "rgb", image_rows("rgb", "RGB", (30, 20)), IMAGE),
        write(tmp_path, "rgba", image_rows("rgba", "RGBA", (16, 16)), IMAGE),
    ]
    prepared = prepare_files(
        files, ["gray"], ["rgb", "rgba"], input="image", image_size=16, channels=channels
    )
    assert prepared.modality == "image"
    assert prepared.input_shape == (channels, 16, 16)
    # a gray image and an RGB(A) image of the same level are the same input after conversion
    source = torch.cat([prepared.source_train.x, prepared.source_val.x]).flatten(1)
    for name in ("rgb", "rgba"):
        target = prepared.targets[name].x
        assert target.shape == (8, channels, 16, 16)
        assert torch.cdist(target.flatten(1), source).min(1).values.max() < 1e-4


def test_pixel_lists_of_several_native_sizes_are_resized(tmp_path: Path) -> None:
    """Flat square pixel lists (as in data/digits) need data.modality: image; nested ones do not."""
    rng = np.random.default_rng(0)

    def rows(domain: str, side: int, nested: bool) -> dict:
        images = rng.integers(0, 256, size=(6, side, side), dtype=np.uint8)
        pixels = [image.tolist() if nested else image.reshape(-1).tolist() for image in images]
        return {"pixels": pixels, "label": [0, 0, 0, 1, 1, 1], "domain": [domain] * 6}

    flat = datasets.Features(
        {"pixels": datasets.List(datasets.Value("uint8")), "label": datasets.Value("int64"),
         "domain": datasets.Value("string")}
    )  # fmt: skip
    files = [
        write(tmp_path, "big", rows("big", 28, False), flat),
        write(tmp_path, "small", rows("small", 8, False), flat),
    ]
    with pytest.raises(StudyError, match="features inputs have different shapes.*set data.modality: image"):
        prepare_files(files, ["big"], ["small"], input="pixels")
    prepared = prepare_files(
        files, ["big"], ["small"], input="pixels", modality="image", channels=1, image_size=20
    )
    assert prepared.modality == "image" and prepared.input_shape == (1, 20, 20)
    assert prepared.targets["small"].x.shape == (6, 1, 20, 20)

    array = datasets.Features(
        {"pixels": datasets.Array2D((9, 9), "uint8"), "label": datasets.Value("int64"),
         "domain": datasets.Value("string")}
    )  # fmt: skip
    domains = {  # nested lists of one size, and a fixed-shape Array2D of another
        "a": {"path": "parquet", "data_files": write(tmp_path / "a", "a", rows("a", 12, True))},
        "b": {"path": "parquet", "data_files": write(tmp_path / "b", "b", rows("b", 9, True), array)},
    }
    prepared = prepare(DataSpec(domains=domains, input="pixels", image_size=12), ["a"], ["b"], cache=None)
    assert prepared.modality == "image" and prepared.input_shape == (3, 12, 12)
    gray = prepared.targets["b"].x
    assert torch.equal(gray[:, 0], gray[:, 2])  # gray arrays repeated into 3 channels


def test_flat_pixel_list_that_is_not_square_is_a_clear_error(tmp_path: Path) -> None:
    rows = {"pixels": [[0] * 10, [1] * 10], "label": [0, 1], "domain": ["a", "b"]}
    with pytest.raises(StudyError, match="flat pixel list of length 10.*not a square"):
        prepare_files([write(tmp_path, "x", rows)], ["a"], ["b"], input="pixels", modality="image")


def test_text_is_hashed_once_into_token_ids(tmp_path: Path) -> None:
    words = ["great", "awful", "fine", "broken", "lovely", "dull"]
    texts = [f"{a} and {b} item" for a in words for b in words if a != b]
    rows = {
        "text": texts,
        "label": [i // 2 % 2 for i in range(len(texts))],
        "domain": ["a", "b"] * (len(texts) // 2),
    }
    prepared = prepare_files([write(tmp_path, "t", rows)], ["a"], ["b"], input="text", max_tokens=16)
    assert prepared.modality == "text"
    assert prepared.source_train.x.dtype == torch.int32 and prepared.input_shape == (16,)
    # 4 words give 4 unigrams + 3 bigrams; the rest is padding
    assert ((prepared.targets["b"].x > 0).sum(1) == 7).all()


def test_feature_vectors_keep_their_path(tmp_path: Path) -> None:
    rows = {"features": [[float(i), float(i % 3)] for i in range(12)], "label": [i % 2 for i in range(12)],
            "domain": ["a", "b", "c"] * 4}  # fmt: skip
    prepared = prepare_files([write(tmp_path, "f", rows)], ["a", "b"], ["c"])
    assert prepared.modality == "features" and prepared.input_shape == (2,)
    assert prepared.source_train.x.dtype == torch.float32


def test_modality_override_is_checked(tmp_path: Path) -> None:
    rows = {"text": ["one", "two"], "label": [0, 1], "domain": ["a", "b"]}
    with pytest.raises(StudyError, match="does not hold numeric feature vectors"):
        prepare_files([write(tmp_path, "t", rows)], ["a"], ["b"], input="text", modality="features")
    with pytest.raises(StudyError, match="cannot tell text, image or feature vectors.*set data.modality"):
        prepare_files([write(tmp_path, "t", rows)], ["a"], ["b"], input="label")


@pytest.mark.parametrize(
    ("modality", "backbone"), [("features", "mlp"), ("text", "text_bag"), ("image", "conv4")]
)
def test_backbone_defaults_by_modality(modality: str, backbone: str) -> None:
    spec = load_spec(DEMO, ["backbone=null", f"data.modality={modality}"])
    assert spec.backbone == Options(name=backbone)  # resolved in the spec, so logged with its params
    auto = load_spec(DEMO, ["backbone=null"])
    assert auto.backbone is None and auto.backbone_for(modality) == Options(name=backbone)


def test_default_text_backbone_trains_on_prepared_text(tmp_path: Path) -> None:
    texts = [f"review {i} was {'good' if i % 2 else 'bad'}" for i in range(40)]
    rows = {"text": texts, "label": [i // 2 % 2 for i in range(40)], "domain": ["a", "b"] * 20}
    path = write(tmp_path, "t", rows)
    raw = {
        "name": "t",
        "data": {"path": "parquet", "data_files": path, "input": "text"},
        "source": ["a"],
        "target": ["b"],
        "episodes": {"ways": 2, "shots": 1, "queries": 2},
        "algorithms": [{"name": "protonet"}],
    }
    spec = load_spec(raw)
    prepared = prepare(spec.data, spec.source, spec.target, cache=None)
    setup = LearnerSetup.from_spec(spec, spec.algorithms[0], prepared)
    assert setup.backbone == "text_bag"
    net = setup.build().net
    assert net(prepared.targets["b"].x).shape == (20, 2)


TINY = cli_overrides(
    "train.steps=2",
    "train.val_every=1",
    "train.val_episodes=2",
    "train.meta_batch=2",
    "episodes.eval_episodes=3",
    "episodes.shots=[1]",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "targets", "backbone", "runs"),
    [
        ("studies/digits.yaml", ["optdigits"], "conv4", 1),
        ("studies/amazon_sentiment.yaml", ["electronics", "kitchen"], "text_bag", 2),
    ],
)
def test_image_and_text_studies_run_end_to_end(
    prefect_server: None, tracking_uri: str, spec: str, targets: list[str], backbone: str, runs: int
) -> None:
    """The two example studies through the real flow (tiny budget); a rerun reuses every cached task."""
    from mlflow.tracking import MlflowClient

    for _ in range(runs):
        assert main(["run", spec, *TINY, "--tracking-uri", tracking_uri]) == 0
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(load_spec(spec).name)
    children = [
        run
        for run in client.search_runs([experiment.experiment_id], max_results=100)
        if run.data.tags.get("kind") == "evaluation"
    ]
    evaluations = sorted((algorithm, target) for algorithm in ("maml", "protonet") for target in targets)
    assert sorted((r.data.tags["algorithm"], r.data.tags["target_domain"]) for r in children) == sorted(
        evaluations * runs
    )
    assert all(run.data.params["backbone.name"] == backbone for run in children)
    reused = sorted(run.data.tags["reused_cached_results"] for run in children)
    assert reused == ["false"] * len(evaluations) + ["true"] * len(evaluations) * (runs - 1)
