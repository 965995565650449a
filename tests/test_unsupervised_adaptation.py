"""dann's unlabelled target rows: held out of evaluation for every algorithm, handed to dann per target."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from adaptflow.cli import main
from adaptflow.spec import load_spec
from tasks.prepare import prepare
from tests.conftest import DEMO


def test_unlabelled_rows_are_held_out_of_evaluation() -> None:
    spec = load_spec(DEMO, ["data.target_unlabelled_fraction=0.3"])
    prepared = prepare(spec.data, spec.source, spec.target)
    for domain in spec.target:
        evaluated, unlabelled = prepared.targets[domain].x, prepared.target_unlabelled[domain]
        assert len(evaluated) + len(unlabelled) == prepared.rows_per_domain[domain]
        assert 0.25 < len(unlabelled) / prepared.rows_per_domain[domain] < 0.35
        assert not (torch.cdist(evaluated, unlabelled) == 0).any()  # no input in both
    plain = prepare(load_spec(DEMO).data, spec.source, spec.target)
    assert all(len(x) == 0 for x in plain.target_unlabelled.values())
    assert len(plain.targets["webcam"]) == prepared.rows_per_domain["webcam"]


@pytest.mark.slow
def test_dann_trains_once_per_target_on_its_unlabelled_rows(prefect_server: None, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "--set", "data.target_unlabelled_fraction=0.3",
        "--set", "target=[webcam, dslr]",
        "--set", "episodes.shots=[1, 3]",
        "--set", "algorithms=[{name: protonet}, {name: dann, warmup_steps: 10}]",
        "--set", "seeds=[0]",
        "--set", "train.steps=10",
        "--set", "train.val_every=5",
        "--set", "train.val_episodes=10",
        "--set", "episodes.eval_episodes=20",
    ]  # fmt: skip
    assert main(["run", str(DEMO), *args, "--tracking-uri", uri]) == 0
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("office-caltech-demo")
    children = client.search_runs([experiment.experiment_id], "tags.kind = 'evaluation'")
    dann = [run for run in children if run.data.tags["algorithm"] == "dann"]
    assert sorted((r.data.tags["target_domain"], r.data.tags["shots"]) for r in dann) == [
        ("dslr", "1"), ("dslr", "3"), ("webcam", "1"), ("webcam", "3"),
    ]  # fmt: skip
    # one model per target: the two targets' dann models differ
    states = {}
    for run in dann:
        if run.data.tags["shots"] == "1":
            folder = tmp_path / run.info.run_id
            folder.mkdir()
            model_id = run.data.tags["model_uri"].removeprefix("models:/")
            location = client.get_logged_model(model_id).artifact_location
            states[run.data.tags["target_domain"]] = torch.load(
                mlflow.artifacts.download_artifacts(f"{location}/weights.pt", dst_path=str(folder)),
                weights_only=True,
            )
    webcam, dslr = states["webcam"], states["dslr"]
    assert any(not torch.equal(webcam[key], dslr[key]) for key in webcam if torch.is_tensor(webcam[key]))
