"""The study flow end to end: real Prefect (temporary server), real MLflow (sqlite), real data."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client

from adaptflow.cli import main
from adaptflow.errors import StudyError
from metalib import TrainingHistory
from tasks.models import log_training
from tasks.tracking import CURVE_POINTS, binned, open_store, training_curves_binned
from tasks.train import TrainedModel
from tests.conftest import DEMO, ROOT

pytestmark = pytest.mark.slow

FirstRun = tuple[str, Path]  # tracking URI, folder
ALGORITHMS = ["protonet", "finetune"]
SEEDS, TARGETS, SHOTS = [0, 1], ["webcam", "dslr"], [1, 5]
SMALL = [
    "--set", "train.steps=20",
    "--set", "train.val_every=10",
    "--set", "train.val_episodes=20",
    "--set", "episodes.eval_episodes=10",
    "--set", "seeds=[0, 1]",
    "--set", "algorithms=[{name: protonet}, {name: finetune, adapt_steps: 20}]",
]  # fmt: skip


def runs_by_kind(client: MlflowClient, experiment_id: str) -> tuple[list[Run], list[Run]]:
    runs = client.search_runs([experiment_id], max_results=1000)
    parents = [run for run in runs if run.data.tags.get("kind") == "study"]
    children = [run for run in runs if run.data.tags.get("kind") == "evaluation"]
    return parents, children


def child_key(run: Run) -> tuple[str, str, str, str]:
    tags = run.data.tags
    return tags["algorithm"], tags["seed"], tags["target_domain"], tags["shots"]


@pytest.fixture(scope="module")
def first_run(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> FirstRun:
    """One real study run with a tiny budget; later tests rerun it against the same stores."""
    folder = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    assert main(["run", str(DEMO), *SMALL, "--tracking-uri", uri]) == 0
    return uri, folder


def test_study_logs_a_parent_and_one_child_per_evaluation(
    first_run: FirstRun, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, folder = first_run
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("office-caltech-demo")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parents, children = runs_by_kind(client, experiment.experiment_id)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert sorted(child_key(run) for run in children) == sorted(
        (a, str(s), t, str(k)) for a in ALGORITHMS for s in SEEDS for t in TARGETS for k in SHOTS
    )
    for run in children:
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["source_domains"] == "amazon,caltech" and tags["ways"] == "5"
        assert tags["normalisation"] == "none"  # the demo's mlp has no BatchNorm
        assert len(tags["episodes_digest"]) == 64
        assert tags["prefect_flow_run_id"] == parent.data.tags["prefect_flow_run_id"]
        assert 0.0 < metrics["acc"] <= 1.0 and metrics["acc_ci95"] > 0
        assert 0.2 < metrics["source_val_acc"] <= 1.0
        assert params["train.steps"] == "20" and params["backbone.hidden"] == "[256, 128]"
        assert params["hparams.lr"] == "0.001"
        # only what applies: feature-vector settings, no image or text ones, no other algorithm, no unset
        assert params["data.log1p"] == "True" and "data.image_size" not in params
        assert not any(key.startswith("algorithms.") or value == "None" for key, value in params.items())
        assert not client.get_metric_history(run.info.run_id, "train/loss")  # in the model run, once
        artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
        assert artifacts == {"episode_accuracies.json", "spec.yaml"}
        assert tags["model_uri"].startswith("models:/m-")  # the logged model, stored once
    models = client.search_runs([experiment.experiment_id], "tags.kind = 'model'")
    assert len(models) == len(ALGORITHMS) * len(SEEDS)
    for model in models:  # the training's curves and plot, once per model
        loss = client.get_metric_history(model.info.run_id, "train/loss")
        assert sorted(point.step for point in loss) == list(range(1, 21))
        assert {item.path for item in client.list_artifacts(model.info.run_id)} == {"learning_curve.png"}
        assert 0.2 < model.data.metrics["source_val_acc"] <= 1.0
    finetune = [run for run in children if run.data.tags["algorithm"] == "finetune"]
    assert all(run.data.params["hparams.adapt_steps"] == "20" for run in finetune)

    assert (
        parent.data.params["algorithms.0.name"] == ALGORITHMS[0] and "data.ngrams" not in parent.data.params
    )
    parent_artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "runs.csv", "spec.yaml"} <= parent_artifacts
    inputs = client.get_run(parent.info.run_id).inputs.dataset_inputs
    assert inputs and inputs[0].dataset.name == "office_caltech10_surf"

    # the results table holds one row per algorithm x target x shots, pooled over both seeds
    table = Path(client.download_artifacts(parent.info.run_id, "results.csv", str(folder)))
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == len(ALGORITHMS) * len(TARGETS) * len(SHOTS)
    assert all(row["runs"] == "2" and row["episodes"] == "20" for row in rows)
    by_key = {child_key(run): run.data.metrics["acc"] for run in children}
    for row in rows:
        seed_means = [by_key[(row["algorithm"], str(s), row["target"], row["shots"])] for s in SEEDS]
        assert float(row["acc"]) == pytest.approx(sum(seed_means) / 2)
    # the answer on the study's own MLflow page: one metric per cell, the table as its description
    assert parent.data.metrics == {
        f"acc/{row['algorithm']}/{row['target']}/{row['shots']}shot": pytest.approx(float(row["acc"]))
        for row in rows
    }
    assert "| finetune |" in parent.data.tags["mlflow.note.content"]
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(parent.data.tags["prefect_flow_run_id"])
    assert flow_run.name == "office-caltech-demo·webcam+dslr"


def test_rerun_reuses_cached_work_and_reproduces_the_numbers(
    first_run: FirstRun, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, _ = first_run
    capsys.readouterr()
    assert main(["run", str(DEMO), *SMALL, "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert "dslr 1-shot" in printed
    assert f"bin/adaptflow ui --study office-caltech-demo --tracking-uri {uri}\n" in printed
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("office-caltech-demo")
    parents, children = runs_by_kind(client, experiment.experiment_id)
    assert len(parents) == 2 and len(children) == 32
    latest = max(parents, key=lambda run: run.info.start_time).info.run_id
    new = [run for run in children if run.data.tags["mlflow.parentRunId"] == latest]
    old = [run for run in children if run.data.tags["mlflow.parentRunId"] != latest]
    assert all(run.data.tags["reused_cached_results"] == "true" for run in new)
    assert all(run.data.tags["reused_cached_results"] == "false" for run in old)
    assert {child_key(r): r.data.metrics["acc"] for r in new} == {
        child_key(r): r.data.metrics["acc"] for r in old
    }
    # the rerun was compared with the first run of the same spec and cells: nothing moved
    from prefect.artifacts import Artifact

    first, second = sorted(parents, key=lambda run: run.info.start_time)
    assert first.data.tags["spec_digest"] == second.data.tags["spec_digest"]
    changes = Artifact.get("changes")
    assert changes is not None and f"Changes since run {first.info.run_id}" in changes.data
    assert "Nothing moved beyond its interval" in changes.data


def test_recomputing_with_the_same_seeds_gives_the_same_numbers(first_run: FirstRun) -> None:
    """With Prefect's cache bypassed, training and evaluation run again and agree exactly."""
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    uri, _ = first_run
    with temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True}):
        assert main(["run", str(DEMO), *SMALL, "--tracking-uri", uri]) == 0
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("office-caltech-demo")
    parents, children = runs_by_kind(client, experiment.experiment_id)
    first, *_, last = sorted(parents, key=lambda run: run.info.start_time)

    def accuracies(parent: Run) -> dict[tuple[str, ...], tuple[float, float]]:
        mine = [r for r in children if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        return {child_key(r): (r.data.metrics["acc"], r.data.metrics["source_val_acc"]) for r in mine}

    recomputed = [r for r in children if r.data.tags["mlflow.parentRunId"] == last.info.run_id]
    assert all(run.data.tags["reused_cached_results"] == "false" for run in recomputed)
    assert accuracies(last) == accuracies(first)


def test_flow_rejects_bad_data_before_touching_mlflow(prefect_server: None, tmp_path: Path) -> None:
    """The flow itself (as a deployment runs it, without the CLI) validates before logging."""
    from flows.study import study

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(StudyError, match=r"\['photos'\] not found"):
        study(spec=str(DEMO), overrides=["target=[photos]"], tracking_uri=uri)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_saved_model_evaluated_again_scores_what_its_study_scored(
    first_run: FirstRun, capsys: pytest.CaptureFixture[str]
) -> None:
    """`adaptflow evaluate` on a registered model version, with the study's spec: the same episodes
    (digest) and accuracies as the study's own evaluation of that model, for protonet and for
    fine-tuning (whose heads start from torch's process-wide generator, so its evaluations must not
    interleave); data of another shape is a clear error."""
    uri, _ = first_run
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("office-caltech-demo").experiment_id
    parents, children = runs_by_kind(client, experiment)
    first = min(parents, key=lambda run: run.info.start_time).info.run_id
    versions = client.search_model_versions("name = 'office-caltech-demo'")
    assert len(versions) == len(ALGORITHMS) * len(SEEDS)  # each model registered once, reruns too

    def scores(runs: list[Run]) -> dict[tuple[str, ...], tuple[float, str]]:
        return {child_key(r): (r.data.metrics["acc"], r.data.tags["episodes_digest"]) for r in runs}

    for algorithm in ALGORITHMS:
        studied = [
            run
            for run in children
            if run.data.tags["mlflow.parentRunId"] == first and child_key(run)[:2] == (algorithm, "1")
        ]
        model_run = studied[0].data.tags["model_run_id"]
        (version,) = [v for v in versions if v.run_id == model_run]
        assert version.tags["algorithm"] == algorithm and version.tags["seed"] == "1"

        uri_of_version = f"models:/office-caltech-demo/{version.version}"
        assert main(["evaluate", uri_of_version, "--spec", str(DEMO), *SMALL, "--tracking-uri", uri]) == 0
        parents, children = runs_by_kind(client, experiment)
        (again,) = [run for run in parents if run.data.tags.get("evaluated_model") == uri_of_version]
        assert again.info.status == "FINISHED"
        rerun = [run for run in children if run.data.tags["mlflow.parentRunId"] == again.info.run_id]
        assert len(rerun) == len(TARGETS) * len(SHOTS) and scores(rerun) == scores(studied)
        assert all(run.data.tags["model_run_id"] == model_run for run in rerun)

    capsys.readouterr()
    logged_model = studied[0].data.tags["model_uri"]  # models:/<model id>
    assert main(["evaluate", logged_model, "--spec", "studies/digits.yaml", "--tracking-uri", uri]) == 2
    assert "the model takes inputs of shape (800,)" in capsys.readouterr().err


def test_a_study_loads_no_plotting_library_until_it_draws() -> None:
    """pyplot takes 0.4 s to import and a cached rerun draws nothing, so the study's modules leave it
    to the first figure (tasks/plots.py:pyplot), which then draws to files (Agg), not to a screen."""
    probe = (
        "import sys, flows.study, flows.evaluate, tasks.report; from tasks.plots import pyplot; "
        "loaded = 'matplotlib.pyplot' in sys.modules; print(loaded, pyplot().get_backend().lower())"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}  # not Agg: the probe must set Agg itself
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "agg"]


def test_binned_curves_have_the_limits_points_as_means_of_even_windows() -> None:
    def curve(steps: int) -> list[tuple[int, float]]:
        return [(step, float(step)) for step in range(1, steps + 1)]

    assert binned([]) == [] and binned(curve(320)) == curve(320)  # a curve that fits, as it is
    one_over = binned(curve(321))  # one window of two steps
    assert len(one_over) == 320 and one_over[-1] == (321, 321.0)
    assert [(step, value) for step, value in one_over if value != step] == [(162, 161.5)]
    long = binned(curve(3000))  # windows of 9 or 10 steps
    assert len(long) == 320 and long[0] == (9, 5.0) and long[-1] == (3000, 2996.0)
    assert {later[0] - earlier[0] for earlier, later in zip(long, long[1:])} == {9, 10}
    curves = {name: curve(400) for name in ("train/loss", "webcam/train/acc", "val/acc", "train/val/acc")}
    lengths = {name: len(points) for name, points in training_curves_binned(curves).items()}
    assert lengths == {"train/loss": 320, "webcam/train/acc": 320, "val/acc": 400, "train/val/acc": 400}


def test_a_long_trainings_curves_are_logged_as_means_of_consecutive_steps(tmp_path: Path) -> None:
    """MLflow gets CURVE_POINTS points of a longer training curve (its charts draw 320 per view): for
    1,000 steps, means of 3 or 4 consecutive steps at the last of them; the validation curve, where the
    best step is chosen, whole."""
    history = TrainingHistory()
    for step in range(1, 1001):
        history.add(step, {"train/loss": float(step), "train/acc": 0.5})
        if step % 2 == 0:
            history.add(step, {"val/acc": step / 1000})
    client = open_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("curves")).info.run_id
    log_training(client, run_id, TrainedModel({}, history, 1.0), "model")
    loss = sorted((point.step, point.value) for point in client.get_metric_history(run_id, "train/loss"))
    assert len(loss) == CURVE_POINTS
    assert loss[0] == (3, 2.0) and loss[-1] == (1000, 999.0)  # (1+2+3)/3, (998+999+1000)/3
    validation = sorted((point.step, point.value) for point in client.get_metric_history(run_id, "val/acc"))
    assert validation == history.curves["val/acc"] and len(validation) == 500
