"""Every bad input gets one clear error naming the problem and the fix, before any training,
and leaves nothing in the MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adaptflow.cli import main
from tests.conftest import DEMO, ROOT


def write_spec(tmp_path: Path, **changes: object) -> Path:
    spec = yaml.safe_load(DEMO.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = spec
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_cli(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Runs `adaptflow run`; asserts it failed cleanly and wrote no MLflow store; returns stderr."""
    db = tmp_path / "mlflow.db"
    code = main(["run", *args, "--tracking-uri", f"sqlite:///{db}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "adaptflow: error: " in err
    assert "Traceback" not in err
    assert not db.exists() and not (tmp_path / "mlruns").exists()
    return err


def test_missing_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(tmp_path / "nope.yaml")], tmp_path, capsys)
    assert "nope.yaml not found" in err


def test_spec_that_is_not_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n  data: {")
    assert "is not valid YAML" in run_cli([str(path)], tmp_path, capsys)


def test_unknown_key_names_key_and_allowed_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "train.stepz=5"], tmp_path, capsys)
    assert "train.stepz: unknown key" in err
    assert "steps" in err and "meta_batch" in err


def test_unknown_domain_lists_the_domains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(write_spec(tmp_path, target=["webcam", "photos"]))], tmp_path, capsys)
    assert "['photos'] not found" in err
    assert "amazon" in err and "caltech" in err and "dslr" in err


def test_missing_column_lists_the_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "data.input=pixels"], tmp_path, capsys)
    assert "['pixels'] not in the dataset" in err
    assert "features" in err and "class_name" in err and "data.input" in err


def test_unreachable_hub_id_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "data.path=someone/no-such-dataset"], tmp_path, capsys)
    assert "could not be reached" in err and "local copy" in err


def test_too_few_examples_per_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "episodes.queries=6"], tmp_path, capsys)
    # dslr has 8 images of class 8 and 10 of class 4; 5 shots + 6 queries need 11
    assert "target domain 'dslr'" in err
    assert "8: 8" in err and "4: 10" in err
    assert "episodes.ways, train.ways, episodes.shots or episodes.queries" in err


def test_more_ways_than_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "episodes.ways=12"], tmp_path, capsys)
    assert "ways=12 but only 10 classes are present" in err
    err = run_cli([str(DEMO), "--set", "train.ways=11"], tmp_path, capsys)
    assert "source training pool: ways=11 but only 10 classes are present" in err
    assert "training ways 11" in err and "target domain" not in err


def test_more_training_ways_for_a_ways_sized_learner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--set", "train.ways=8", "--set", "algorithms=[{name: protonet}, {name: maml}, {name: cnp}]"]
    err = run_cli([str(DEMO), *args], tmp_path, capsys)
    assert "train.ways=8 differs from episodes.ways=5" in err
    assert "['cnp', 'maml']" in err and "protonet" in err.split("suits")[1]


def test_unknown_algorithm_and_hyperparameter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "algorithms=[{name: protonett}]"], tmp_path, capsys)
    assert "unknown algorithm 'protonett'" in err and "protonet" in err
    err = run_cli([str(DEMO), "--set", "algorithms=[{name: finetune, adapt_stepz: 3}]"], tmp_path, capsys)
    assert "has no hyperparameter adapt_stepz" in err and "adapt_steps" in err
    err = run_cli(
        [str(DEMO), "--set", "algorithms=[{name: protonet, distance: manhattan}]"], tmp_path, capsys
    )
    assert "distance must be 'euclidean' or 'cosine', not 'manhattan'" in err


def test_one_algorithm_twice_needs_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "algorithms=[{name: protonet}, {name: protonet, distance: cosine}]"],
                  tmp_path, capsys)  # fmt: skip
    assert "['protonet'] appear more than once" in err and "label" in err
    labelled = "algorithms=[{name: protonet}, {name: protonet, label: protonet_cos, distance: cosine}]"
    assert main(["validate", str(DEMO), "--set", labelled]) == 0


def test_bad_backbone_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "backbone.widths=[64]"], tmp_path, capsys)
    assert "on backbone 'mlp'" in err and "widths" in err


def test_source_and_target_must_differ(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "target=[webcam, amazon]"], tmp_path, capsys)
    assert "['amazon'] are both source and target" in err


def test_validate_command_accepts_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(DEMO)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "'dslr': 157" in out


def test_images_too_small_for_conv4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(ROOT / "studies" / "digits.yaml"), "--set", "data.image_size=12"], tmp_path, capsys)
    assert "images must be at least 16x16, not 12x12; raise data.image_size" in err
