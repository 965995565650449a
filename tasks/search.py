"""Search: each algorithm's hyperparameters chosen on source data only, with one budget for all.

One Optuna study per (spec, algorithm), named by everything that decides a trial's outcome, lives in
its own storage (Optuna and MLflow both keep their schema version in a table named alembic_version,
so they cannot share one database). A killed search resumes from it: finished trials are never run
again, and the trial that was running is run again with the same hyperparameters. A trial is a
Prefect task that meta-trains one configuration and scores it on source data; the flow asks and
tells (flows/search.py) and logs every finished trial once as an MLflow run under the study run.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState
from prefect import task

from adaptflow.errors import StudyError
from adaptflow.settings import PROJECT_DIR
from adaptflow.spec import SearchSpec, StudySpec, TrainSpec
from metalib import EpisodeSampler, TrainingHistory, meta_train
from metalib.device import one_thread
from metalib.evaluation import Stopped, episode_accuracies
from metalib.search_space import Choice, FloatRange, SearchSpace
from metalib.seeding import derive_seed
from metalib.training import NonFiniteLoss
from tasks import stopping
from tasks.allocator import keep_freed_memory
from tasks.caching import stable_token
from tasks.plots import pyplot
from tasks.prepare import Pool, PreparedData
from tasks.run_states import OWNER_TAG, dead_here, owner
from tasks.tracking import StudyRun, log_file, log_flat, start_child_run, training_curves_binned
from tasks.train import LearnerSetup, source_episodes

optuna.logging.set_verbosity(optuna.logging.WARNING)

# How every table names a searched configuration: the selection rule, never the target.
RULE_SUFFIX = {"source_validation": "search", "leave_one_source_out": "search:loso"}
INTERRUPTED = "interrupted"  # user attribute of a trial whose process died; it is run again
# "<search key>#<trial number>@<start time>" on the trial's MLflow run: unique even if the Optuna storage
# is deleted and the search started again into the same MLflow experiment
TRIAL_TAG = "adaptflow.trial"


def searched_label(label: str, search: SearchSpec) -> str:
    """The label a searched configuration carries in results, e.g. 'protonet [search]'."""
    return f"{label} [{RULE_SUFFIX[search.selection]}]"


def search_storage(search: SearchSpec, tracking_uri: str) -> str:
    """The spec's storage, else an sqlite file next to an sqlite MLflow store (or in the project)."""
    if search.storage:
        return search.storage
    prefix = "sqlite:///"
    folder = Path(tracking_uri[len(prefix) :]).parent if tracking_uri.startswith(prefix) else PROJECT_DIR
    return f"sqlite:///{folder.resolve() / 'optuna.db'}"


def search_key(spec: StudySpec, prepared: PreparedData, setup: LearnerSetup) -> str:
    """The Optuna study's name: the spec name, the label, and a digest of everything that decides a
    trial's score. The budget is left out, so raising `trials` continues the same search."""
    assert spec.search is not None
    decided_by = {
        "data": prepared.fingerprint,
        "source": spec.source,
        "target": spec.target,  # learners that adapt without labels read a target's unlabelled rows
        "ways": spec.episodes.ways,
        "queries": spec.episodes.queries,
        "shots": spec.train_shots,
        # checkpoint_seconds left out: it decides nothing here (trials do not checkpoint), and keys
        # made before it existed still name their searches
        "train": spec.train.model_dump(exclude={"device", "checkpoint_seconds"}),
        "setup": stable_token(setup),
        "search": spec.search.model_dump(exclude={"trials", "storage"}),
    }
    digest = hashlib.sha256(json.dumps(decided_by, sort_keys=True, default=str).encode()).hexdigest()
    return f"{spec.name}/{setup.label}/{digest[:12]}"


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """metalib's ranges as Optuna distributions."""
    converted: dict[str, BaseDistribution] = {}
    for name, value in space.items():
        if isinstance(value, Choice):
            converted[name] = CategoricalDistribution(list(value.values))
        elif isinstance(value, FloatRange):
            converted[name] = FloatDistribution(value.low, value.high, log=value.log)
        else:
            converted[name] = IntDistribution(value.low, value.high, log=value.log)
    return converted


def pruner(search: SearchSpec) -> optuna.pruners.BasePruner:
    """The spec's pruner: it is not stored with the study, so every process that reports makes it."""
    if search.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(2, search.trials // 4)), n_warmup_steps=0)


def open_search(search: SearchSpec, storage: str, key: str, space: SearchSpace) -> optuna.Study:
    """The search's Optuna study, created or reloaded; trials of dead processes are failed, marked
    interrupted and queued again with their hyperparameters (if all were drawn before the process died)."""
    study = optuna.create_study(
        storage=storage, study_name=key, direction="maximize", pruner=pruner(search), load_if_exists=True
    )
    # Seeded by the trials made so far: a resumed search must not draw its first trials again.
    seed = derive_seed(search.seed, "sampler", len(study.get_trials(deepcopy=False)))
    study.sampler = (
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, search.trials // 3)))
        if search.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        process = trial.user_attrs.get(OWNER_TAG)
        # no owner: killed between Optuna creating the trial and `ask` naming its owner
        if process is None or dead_here(process):
            end_interrupted(study, trial, requeue=set(trial.params) == set(space))
    return study


def end_interrupted(study: optuna.Study, trial: FrozenTrial, requeue: bool) -> None:
    """Fails an interrupted trial, marked so (it does not count against the budget), and with `requeue`
    queues its hyperparameters again, so that the next start of the search trains them first."""
    study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    if requeue:
        study.enqueue_trial(trial.params)


def finished(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that used up budget: complete, pruned, or failed on their own (not interrupted)."""
    return [
        trial
        for trial in study.get_trials(deepcopy=False)
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (trial.state == TrialState.FAIL and not trial.user_attrs.get(INTERRUPTED))
    ]


def ask(study: optuna.Study, space: SearchSpace) -> optuna.Trial:
    """A new trial, owned by this process (so a later start can tell it was interrupted)."""
    trial = study.ask(distributions(space))
    trial.set_user_attr(OWNER_TAG, owner())
    return trial


@dataclass(frozen=True)
class Fold:
    """Train on `train` (model selection on `val`), then score on `held_out` episodes, if given."""

    train: Pool
    val: Pool
    held_out: Pool | None = None
    name: str = "source validation"


def folds(search: SearchSpec, spec: StudySpec, prepared: PreparedData) -> list[Fold]:
    """The data of each training a trial makes. Only source rows, whatever the rule. Built in the
    flow's thread, so on one torch thread (`metalib.device.one_thread`)."""
    train, val = prepared.source_train, prepared.source_val
    if search.selection == "source_validation":
        return [Fold(train, val)]
    made = []
    with one_thread():
        for index, domain in enumerate(spec.source):
            assert train.domain is not None and val.domain is not None
            held_out = Pool(
                torch.cat([train.x[train.domain == index], val.x[val.domain == index]]),
                torch.cat([train.y[train.domain == index], val.y[val.domain == index]]),
            )
            made.append(
                Fold(train.where(train.domain != index), val.where(val.domain != index), held_out, domain)
            )
    return made


@dataclass(frozen=True)
class TrialOutcome:
    """A trial's score (None: pruned or failed), its curves and why it stopped early, if it did."""

    score: float | None
    state: TrialState
    curves: dict[str, list[tuple[int, float]]]
    seconds: float
    message: str = ""


@task(name="search-trial", cache_policy=None, persist_result=False)
def run_trial(
    search: SearchSpec,
    storage: str,
    key: str,
    trial_id: int,
    setup: LearnerSetup,
    trial_folds: list[Fold],
    train: TrainSpec,
    shots: int,
    queries: int,
    seed: int,
    unlabelled_target: torch.Tensor | None = None,
) -> TrialOutcome:
    """Meta-trains `setup` on each fold and scores it: the best source-validation accuracy, or (leave
    one source out) the mean accuracy on the held-out source domains. Reports to the pruner as it goes:
    the validation curve, or each held-out domain's accuracy in turn."""
    keep_freed_memory()
    trial = optuna.Trial(optuna.load_study(study_name=key, storage=storage, pruner=pruner(search)), trial_id)
    started = time.perf_counter()
    curves: dict[str, list[tuple[int, float]]] = {}
    scores = []
    try:
        for index, fold in enumerate(trial_folds):
            history, held_out_acc = _train_fold(
                setup, fold, train, shots, queries, seed, unlabelled_target, trial
            )
            prefix = "" if fold.held_out is None else f"{fold.name}/"
            curves.update({f"{prefix}{name}": points for name, points in history.curves.items()})
            scores.append(history.best_val_acc if fold.held_out is None else held_out_acc)
            if fold.held_out is not None:
                curves[f"held_out/{fold.name}"] = [(0, scores[-1])]
                trial.report(sum(scores) / len(scores), index)
                if trial.should_prune():
                    raise optuna.TrialPruned()
    except optuna.TrialPruned:
        return TrialOutcome(None, TrialState.PRUNED, curves, time.perf_counter() - started)
    except Stopped as exc:
        # ended here, not left RUNNING: a later start in this same (long-lived) process would not
        # take it for a dead process's trial. `ask` drew all its hyperparameters, so it is queued again.
        end_interrupted(trial.study, trial.study._storage.get_trial(trial_id), requeue=True)
        return stopping.cancelled(exc)  # a State: Prefect ends the task Cancelled
    except NonFiniteLoss as exc:
        return TrialOutcome(None, TrialState.FAIL, curves, time.perf_counter() - started, str(exc))
    return TrialOutcome(sum(scores) / len(scores), TrialState.COMPLETE, curves, time.perf_counter() - started)


def _train_fold(
    setup: LearnerSetup,
    fold: Fold,
    train: TrainSpec,
    shots: int,
    queries: int,
    seed: int,
    unlabelled_target: torch.Tensor | None,
    trial: optuna.Trial,
) -> tuple[TrainingHistory, float]:
    """Trains on one fold, pruned on its validation curve when that is the score; returns the history
    and the accuracy on the held-out domain's episodes (nan without one)."""
    torch.manual_seed(derive_seed(seed, "init"))
    learner = setup.build()
    if unlabelled_target is not None:
        learner.set_unlabelled_target(unlabelled_target)
    sampler, validation = source_episodes(setup, fold.train, fold.val, shots, queries, train, seed)
    prune_on_curve = fold.held_out is None

    def on_validate(step: int, acc: float) -> None:
        if prune_on_curve and step > 0:
            trial.report(max(acc, best[0]), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        best[0] = max(acc, best[0])

    best = [-math.inf]
    history = meta_train(
        learner,
        sampler,
        steps=train.steps,
        meta_batch=train.meta_batch,
        validation=validation,
        val_every=train.val_every,
        progress=False,
        on_validate=on_validate,
        stop=stopping.STOP_REQUESTED,
    )
    if fold.held_out is None:
        return history, math.nan
    episodes = EpisodeSampler(
        fold.held_out.x, fold.held_out.y, setup.ways, shots, queries, derive_seed(seed, "held out", fold.name)
    ).sample(train.val_episodes)
    return history, episode_accuracies(learner, episodes).mean().item()


def tell(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome) -> None:
    """Records the outcome: curves and time as user attributes (for the MLflow run), then the state."""
    trial.set_user_attr("curves", outcome.curves)
    trial.set_user_attr("seconds", outcome.seconds)
    if outcome.message:
        trial.set_user_attr("error", outcome.message)
    study.tell(trial, outcome.score, state=outcome.state)


def log_trials(run: StudyRun, study: optuna.Study, setup: LearnerSetup, search: SearchSpec) -> int:
    """An MLflow run under the study run for each finished trial not logged yet; returns how many
    were logged now. A trial's run is found by its tag, so a resumed search logs each trial once."""
    client = run.client
    logged = {
        found.data.tags[TRIAL_TAG]
        for found in client.search_runs(
            [run.experiment_id],
            f"tags.`{TRIAL_TAG}` LIKE '{study.study_name}#%' AND attributes.status = 'FINISHED'",
            max_results=50000,
        )
    }
    count = 0
    for trial in finished(study):
        tag = f"{study.study_name}#{trial.number}@{trial.datetime_start.isoformat()}"
        if tag in logged:
            continue
        run_id = start_child_run(
            run,
            f"{setup.label}·trial{trial.number}",
            {
                TRIAL_TAG: tag,
                "kind": "search-trial",
                "algorithm": setup.label,
                "search": study.study_name,
                "selection_rule": search.selection,
                "sampler": search.sampler,
                "trial": str(trial.number),
                "trial_state": trial.state.name,
                **({"error": trial.user_attrs["error"]} if "error" in trial.user_attrs else {}),
            },
        )
        metrics = {"seconds": trial.user_attrs.get("seconds", math.nan)}
        if trial.value is not None:
            metrics["score"] = trial.value
        curves = {
            name: [tuple(point) for point in points]
            for name, points in trial.user_attrs.get("curves", {}).items()
        }
        log_flat(
            client,
            run_id,
            params={f"hparams.{name}": value for name, value in trial_hparams(setup, trial).items()},
            metrics=metrics,
            curves=training_curves_binned(curves),
        )
        client.set_terminated(run_id, "FINISHED")
        count += 1
    return count


def trial_hparams(setup: LearnerSetup, trial: FrozenTrial | optuna.Trial) -> dict[str, Any]:
    """Every hyperparameter of a trial: the setup's, with the trial's sampled values."""
    return with_params(setup, trial.params).resolved_hparams()


def with_params(setup: LearnerSetup, params: dict[str, Any], label: str | None = None) -> LearnerSetup:
    """The setup with hyperparameters replaced (and, for the chosen configuration, a new label)."""
    return replace(setup, hparams={**setup.hparams, **params}, label=label or setup.label)


@dataclass(frozen=True)
class Searched:
    """What one algorithm's search chose, and how."""

    key: str
    params: dict[str, Any]
    score: float
    trial: int
    trials: int
    selection: str

    def tags(self) -> dict[str, str]:
        """Tags of every run trained with the chosen configuration."""
        return {
            "search": self.key,
            "search_trial": str(self.trial),
            "search_score": f"{self.score:.4f}",
            "selection_rule": self.selection,
            "hparams_origin": "search",
        }


def chosen(study: optuna.Study, search: SearchSpec, label: str) -> Searched:
    """The best complete trial; an error naming the algorithm when none completed."""
    complete = [trial for trial in study.get_trials(deepcopy=False) if trial.state == TrialState.COMPLETE]
    if not complete:
        errors = {trial.user_attrs.get("error") for trial in study.get_trials(deepcopy=False)} - {None}
        raise StudyError(
            f"search of {label}: none of its {len(finished(study))} trials completed"
            + (f" (e.g. {sorted(errors)[0]})" if errors else "")
            + "; narrow its search space (search.space) or raise search.trials"
        )
    best = max(complete, key=lambda trial: trial.value)
    return Searched(
        study.study_name, best.params, best.value, best.number, len(finished(study)), search.selection
    )


def log_search_plots(run: StudyRun, study: optuna.Study, label: str) -> None:
    """Optuna's optimisation history and parameter importances as images on the study run."""
    plt = pyplot()  # before optuna's plots import it, so that they draw with Agg too
    from optuna.visualization import matplotlib as optuna_plots

    complete = [trial for trial in study.get_trials(deepcopy=False) if trial.state == TrialState.COMPLETE]
    plots = {"history": optuna_plots.plot_optimization_history}
    if len(complete) >= 2:
        plots["importance"] = optuna_plots.plot_param_importances
    safe = re.sub(r"[^\w.-]+", "_", label)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # said on every call
        for name, plot in plots.items():
            axes = plot(study)
            axes.set_title(f"{label}: {axes.get_title()}")
            path = Path(folder) / f"search_{safe}_{name}.png"
            axes.figure.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(axes.figure)
            log_file(run.client, run.run_id, path)


def search_summary(searches: dict[str, Searched]) -> str:
    """Markdown: what each search chose, for the study's artifact and log."""
    lines = [
        "| algorithm | selection | trials | best score | chosen hyperparameters |",
        "|---|---|---|---|---|",
    ]
    for label, found in searches.items():
        chosen_text = ", ".join(f"{k}={_short(v)}" for k, v in found.params.items())
        lines.append(f"| {label} | {found.selection} | {found.trials} | {found.score:.3f} | {chosen_text} |")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
