"""The hyperparameter search: source data only, one budget for all, resumable after SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from adaptflow.cli import main
from adaptflow.errors import StudyError
from adaptflow.spec import load_spec, parse_spec
from metalib import algorithms
from metalib.search_space import FloatRange
from tasks.prepare import prepare
from tasks.search import ask, finished, folds, open_search, run_trial, with_params
from tasks.stopping import STOP_REQUESTED
from tasks.train import LearnerSetup
from tests.conftest import DEMO, ROOT, TINY_TRAINING, cli_overrides, stop


def test_every_learner_ships_a_search_space_around_its_defaults() -> None:
    for name in algorithms.names():
        space = algorithms.search_space(name)
        defaults = asdict(algorithms.make_hparams(name, {}))
        assert space, f"{name} has no search space"
        for key, value in space.items():
            assert key in defaults, f"{name}: {key} is not a hyperparameter"
            assert value.contains(defaults[key]), (
                f"{name}: the default {key}={defaults[key]} is outside {value}"
            )
        if "lr" in space:
            assert space["lr"] == FloatRange(1e-4, 1e-2, log=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.space.maml={lr: {low: 0.001, high: 0.1}}"], "no algorithm is labelled 'maml'"),
        (["search.space.protonet={inner_lr: {low: 0.01, high: 1}}"], "no hyperparameter 'inner_lr'"),
        (["search.space.protonet={lr: {low: 0.1, high: 0.01}}"], "low (0.1) must be below high (0.01)"),
        (["search.space.protonet={lr: {low: 0, high: 1, log: true}}"], "a log range needs low > 0"),
        (["search.space.protonet={distance: [euclidean]}"], "{choices: [...]}"),
        (["algorithms=[{name: protonet, lr: 0.01}]", "search.space.protonet={lr: {low: 0.001, high: 0.1}}"],
         "the algorithm entry fixes lr"),
        (["source=[amazon]", "search.selection=leave_one_source_out"], "needs 2 or more source domains"),
    ],
)  # fmt: skip
def test_a_bad_search_section_is_an_error_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(StudyError, match="search") as error:
        load_spec(DEMO, ["search.trials=2", *overrides])
    assert message in str(error.value)


def test_the_space_leaves_out_what_an_entry_fixes_and_takes_the_spec_ranges() -> None:
    spec = load_spec(
        DEMO,
        [
            "algorithms=[{name: finetune, adapt_steps: 50}, {name: protonet}]",
            "search={trials: 2, space: {protonet: {distance: {choices: [cosine]}}}}",
        ],
    )
    finetune, protonet = (spec.search_space(entry) for entry in spec.algorithms)
    assert "adapt_steps" not in finetune and set(finetune) == {"lr", "adapt_lr", "adapt_weight_decay"}
    assert protonet["distance"].values == ("cosine",) and "lr" in protonet


def test_leave_one_source_out_trains_on_the_other_sources_and_never_sees_a_target() -> None:
    spec = load_spec(DEMO, ["search={trials: 2, selection: leave_one_source_out}"])
    prepared = prepare(spec.data, spec.source, spec.target)
    made = folds(spec.search, spec, prepared)
    assert [fold.name for fold in made] == spec.source
    source_rows = len(prepared.source_train) + len(prepared.source_val)
    target_rows = torch.cat([pool.x for pool in prepared.targets.values()])
    for index, fold in enumerate(made):
        assert set(fold.train.domain.tolist()) == set(fold.val.domain.tolist()) == {1 - index}
        assert len(fold.train) + len(fold.val) + len(fold.held_out) == source_rows
        for pool in (fold.train, fold.val, fold.held_out):
            assert not (torch.cdist(pool.x, target_rows) == 0).any(), "a target row in a search fold"


def search_trials(storage: Path) -> list[tuple[str, int, str, int]]:
    """(study, trial number, state, sampled parameters) of every trial in an Optuna sqlite storage."""
    if not storage.exists():
        return []
    with sqlite3.connect(storage) as db:
        try:
            return db.execute(
                "select s.study_name, t.number, t.state, (select count(*) from trial_params p "
                "where p.trial_id = t.trial_id) from trials t join studies s using (study_id)"
            ).fetchall()
        except sqlite3.OperationalError:  # Optuna is still creating its tables
            return []


@pytest.mark.slow
def test_a_sigkilled_search_resumes_without_running_a_finished_trial_again(
    prefect_server: None, tmp_path: Path
) -> None:
    """Kill `adaptflow run` while a trial runs; the rerun completes the budget, runs the interrupted
    trial's hyperparameters again, never a finished trial, and logs each trial as one MLflow run."""
    from prefect.settings import PREFECT_API_URL

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "optuna.db"
    budget = 4
    args = [
        "run", str(DEMO), "--tracking-uri", uri,
        *cli_overrides(
            "name=searched", "train.steps=60", "train.val_every=20", "train.val_episodes=10",
            "episodes.eval_episodes=10", "episodes.shots=[1]", "target=[webcam]", "seeds=[0]",
            "algorithms=[{name: protonet}]", f"search={{trials: {budget}, pruner: none}}",
        ),
    ]  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    process = subprocess.Popen(
        [sys.executable, "-m", "adaptflow.cli", *args], cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 240

    def ready() -> bool:  # two trials complete, and a third training (both its parameters drawn)
        trials = search_trials(storage)
        running = [params for _, _, state, params in trials if state == "RUNNING"]
        return [state for _, _, state, _ in trials].count("COMPLETE") >= 2 and 2 in running

    try:
        while not ready():
            assert process.poll() is None, "the study ended before it could be killed"
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        stop(process, grace=1)
    before = search_trials(storage)
    done_before = {number for _, number, state, _ in before if state == "COMPLETE"}
    (interrupted,) = [number for _, number, state, _ in before if state == "RUNNING"]
    (key,) = {name for name, _, _, _ in before}
    study = optuna.load_study(study_name=key, storage=f"sqlite:///{storage}")
    values_before = {t.number: t.value for t in study.get_trials() if t.number in done_before}
    interrupted_params = study.trials[interrupted].params

    assert main(args) == 0

    study = optuna.load_study(study_name=key, storage=f"sqlite:///{storage}")
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == budget  # the budget, not the budget plus what ran before the kill
    assert len({tuple(sorted(t.params.items())) for t in complete}) == budget  # no configuration drawn twice
    assert {t.number: t.value for t in complete if t.number in done_before} == values_before
    assert trials[interrupted].state == TrialState.FAIL and trials[interrupted].user_attrs["interrupted"]
    assert len(trials) == budget + 1  # the finished ones, the interrupted one, and nothing else
    rerun = [t for t in complete if t.number not in done_before]
    assert rerun[0].params == interrupted_params  # the interrupted trial, run again first

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("searched").experiment_id
    trial_runs = client.search_runs([experiment], "tags.kind = 'search-trial'")
    assert sorted(int(run.data.tags["trial"]) for run in trial_runs) == sorted(t.number for t in complete)
    assert all(run.info.status == "FINISHED" and "score" in run.data.metrics for run in trial_runs)
    studies = client.search_runs([experiment], "tags.kind = 'study'", order_by=["attributes.start_time"])
    assert [run.info.status for run in studies] == ["KILLED", "FINISHED"]
    best = max(complete, key=lambda t: t.value)
    (child,) = client.search_runs([experiment], "tags.kind = 'evaluation'")
    assert child.data.tags["algorithm"] == "protonet [search]"
    assert child.data.tags["search"] == key and child.data.tags["search_trial"] == str(best.number)
    assert child.data.tags["hparams_origin"] == "search"
    assert float(child.data.params["hparams.lr"]) == pytest.approx(best.params["lr"])
    assert child.data.params["hparams.distance"] == best.params["distance"]
    plots = {artifact.path for artifact in client.list_artifacts(studies[-1].info.run_id)}
    assert {"search_protonet_history.png", "search_protonet_importance.png"} <= plots


@pytest.mark.slow
def test_a_leave_one_source_out_search_scores_held_out_sources(
    prefect_server: None, tracking_uri: str
) -> None:
    from flows.study import study

    overrides = [
        "name=loso", "train.steps=20", "train.val_every=10", "train.val_episodes=10",
        "episodes.eval_episodes=10", "episodes.shots=[1]", "target=[webcam]", "seeds=[0]",
        "algorithms=[{name: source_only}]",
        "search={trials: 2, selection: leave_one_source_out, sampler: random}",
    ]  # fmt: skip
    rows = study(str(DEMO), overrides, tracking_uri)
    assert [row["algorithm"] for row in rows] == ["source_only [search:loso]"]
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("loso").experiment_id
    trial_runs = client.search_runs([experiment], "tags.kind = 'search-trial'")
    assert len(trial_runs) == 2
    for run in trial_runs:
        held_out = [run.data.metrics[f"held_out/{domain}"] for domain in ("amazon", "caltech")]
        assert run.data.metrics["score"] == pytest.approx(sum(held_out) / 2)
        assert run.data.tags["selection_rule"] == "leave_one_source_out"
    # the searched model is a logged model, its name rid of the characters MLflow refuses (':')
    (logged,) = client.search_logged_models([experiment])
    assert logged.name == "source_only [search-loso]·seed0·model"


def test_a_training_on_another_pool_rebuilds_the_searched_configuration() -> None:
    from flows.study import check_study, pool_spec
    from tasks.search import with_params

    spec = load_spec(
        DEMO, ["algorithms=[{name: protonet}, {name: finetune, adapt_steps: 20}]", "search.trials=2"]
    )
    plan = check_study(spec, prepare(spec.data, spec.source, spec.target))
    chosen = [
        with_params(plan.setups[0], {"lr": 0.004, "distance": "cosine"}, "protonet [search]"),
        with_params(plan.setups[1], {"lr": 0.0002, "adapt_lr": 0.05}, "finetune [search]"),
    ]
    plan = replace(plan, setups=chosen)
    for index, setup in enumerate(chosen):
        rebuilt = check_study(parse_spec(pool_spec(plan, index)), plan.prepared).setups[index]
        assert rebuilt == setup  # the label and every hyperparameter, the entry's fixed ones included


def test_a_trial_stopped_by_an_interruption_is_queued_again_in_the_same_process(
    prefect_server: None, tmp_path: Path
) -> None:
    """An interrupted trial ends FAILED and marked interrupted at once, with its hyperparameters queued
    again: a later start in the same long-lived process (a served deployment, `main()` called again),
    whose owner is alive, would otherwise find it RUNNING and never train it."""
    spec = load_spec(DEMO, [*TINY_TRAINING, "search.trials=2", "algorithms=[{name: protonet}]"])
    assert spec.search is not None
    prepared = prepare(spec.data, spec.source, spec.target)
    setup = LearnerSetup.from_spec(spec, spec.algorithms[0], prepared)
    space = spec.search_space(spec.algorithms[0])
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    trial = ask(open_search(spec.search, storage, "stopped", space), space)
    STOP_REQUESTED.set()
    try:
        state = run_trial(
            spec.search, storage, "stopped", trial._trial_id, with_params(setup, trial.params),
            folds(spec.search, spec, prepared), spec.train, spec.train_shots, spec.episodes.queries,
            spec.search.seed, return_state=True,
        )  # fmt: skip
    finally:
        STOP_REQUESTED.clear()
    assert state.is_cancelled()
    reopened = open_search(spec.search, storage, "stopped", space)  # this process, alive: not "dead"
    (stopped,) = reopened.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    assert stopped.number == trial.number and stopped.user_attrs["interrupted"]
    assert not finished(reopened)  # it does not count against the budget
    assert ask(reopened, space).params == trial.params  # trained first on the next start
