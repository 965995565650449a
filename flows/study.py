"""The `study` flow: prepare -> train each (algorithm, seed) -> evaluate each target x shots -> report.

Tasks cache on their inputs, so rerunning a spec reuses prepared data, trained models and
evaluations that finished before; every execution still gets its own complete MLflow parent run.
The steps are public so the `sweep` flow (flows/sweep.py) runs many studies from the same pieces.
"""

from __future__ import annotations

import gc
import os
import signal
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from prefect import flow
from prefect.futures import PrefectFuture
from prefect.runtime import deployment, flow_run
from prefect.settings import get_current_settings
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from adaptflow import settings
from adaptflow.errors import StudyError
from adaptflow.spec import StudySpec, load_spec
from flows.search import search_algorithms
from metalib.device import one_thread
from metalib.seeding import derive_seed
from tasks.allocator import keep_freed_memory
from tasks.artifacts import link_mlflow_run, study_run_name
from tasks.evaluate import Evaluation, evaluate_model
from tasks.models import ModelRef, log_failed_training, log_model
from tasks.prepare import PreparedData, check_episode_shapes, prepare, prepare_data
from tasks.progress import StudyProgress
from tasks.report import Result, log_evaluation, report_study
from tasks.run_states import OWNER_TAG, end_stale_runs, owner
from tasks.search import Searched
from tasks.stopping import STOP_REQUESTED, interruption_behind, release_frames
from tasks.tracking import StudyRun, is_transient, start_study_run, study_datasets, tracking_store
from tasks.train import LearnerSetup, TrainedModel, check_pool_spec, train_model, train_on_pool

# The `train` flow's deployment on the GPU pool (prefect.yaml).
GPU_TRAINING = "train/gpu"


@dataclass(frozen=True)
class StudyPlan:
    """A validated study: its spec, prepared data and one learner setup per algorithm."""

    spec: StudySpec
    prepared: PreparedData
    setups: list[LearnerSetup]
    searches: dict[str, Searched] = field(default_factory=dict)  # by label: how a search chose it


@dataclass(frozen=True)
class PendingEvaluation:
    """One (algorithm, seed, target, shots) whose training and evaluation are submitted."""

    setup: LearnerSetup
    seed: int
    target: str
    shots: int
    trained: PrefectFuture[TrainedModel]
    evaluation: PrefectFuture[Evaluation]


def validate_study(spec: StudySpec) -> PreparedData:
    """Every check a study run makes before training, without Prefect or an MLflow store."""
    prepared = prepare(spec.data, spec.source, spec.target)
    check_study(spec, prepared)
    return prepared


def plan_study(spec: StudySpec) -> StudyPlan:
    """Prepares the data (a cached task) and checks everything before MLflow is touched."""
    return check_study(spec, prepare_data(spec.data, spec.source, spec.target))


def check_study(spec: StudySpec, prepared: PreparedData) -> StudyPlan:
    """The one place that says whether a spec runs on its data: validate and run both call it.

    Checks the episodes each pool must supply, builds every learner once, and builds (without
    writing) the MLflow dataset inputs of the parent run; raises StudyError on any problem.
    """
    check_episode_shapes(spec, prepared)
    # the backbone the data's modality implies, when the spec leaves it out, is logged as chosen
    spec = spec.model_copy(update={"backbone": spec.backbone_for(prepared.modality)})
    setups = [LearnerSetup.from_spec(spec, algorithm, prepared) for algorithm in spec.algorithms]
    with one_thread():  # in the flow's thread, which trains nothing: metalib.device.one_thread
        for setup in setups:
            setup.check()
    if trains_on_gpu_pool(spec):
        check_pool_spec(spec.model_dump(mode="json"))
    study_datasets(spec, prepared.fingerprint, prepared.rows_per_domain)
    return StudyPlan(spec, prepared, setups)


def searched(plan: StudyPlan, run: StudyRun) -> StudyPlan:
    """The plan with each algorithm's configuration chosen by the spec's search (run, or resumed, under
    the open study run `run`); the plan itself when the spec has no search."""
    if plan.spec.search is None:
        return plan
    setups, searches = search_algorithms(plan.spec, plan.prepared, plan.setups, run)
    return replace(plan, setups=setups, searches=searches)


# (algorithm index, seed, target domain): the target is None except for learners trained on one
# target domain's unlabelled rows (dann), which train once per target.
TrainingKey = tuple[int, int, str | None]


def training_keys(plan: StudyPlan) -> list[TrainingKey]:
    return [
        (index, seed, target)
        for index, setup in enumerate(plan.setups)
        for seed in plan.spec.seeds
        for target in (plan.spec.target if setup.uses_unlabelled_target else [None])
    ]


def training_inputs(
    plan: StudyPlan, setup: LearnerSetup, seed: int, target: str | None = None
) -> dict[str, Any]:
    """The inputs of `train_model` for one (algorithm, seed[, target]): the same wherever it trains."""
    spec, prepared = plan.spec, plan.prepared
    return {
        "setup": setup,
        "source_train": prepared.source_train,
        "source_val": prepared.source_val,
        "train": spec.train,
        "shots": spec.train_shots,
        "queries": spec.episodes.queries,
        "seed": seed,
        "unlabelled_target": prepared.target_unlabelled[target] if target else None,
    }


def trains_on_gpu_pool(spec: StudySpec) -> bool:
    """A deployment run that asks for CUDA sends training to the GPU pool; local runs train here."""
    return spec.train.device.startswith("cuda") and deployment.id is not None


def pool_spec(plan: StudyPlan, index: int) -> dict[str, Any]:
    """The spec a training on another pool rebuilds algorithm `index` from: a searched configuration
    is written into its entry (with its label), and the search left out, so it is not run again."""
    spec = plan.spec.model_dump(mode="json")
    if plan.spec.search is None:
        return spec
    setup = plan.setups[index]
    spec["algorithms"][index] = {"name": setup.algorithm, "label": setup.label, **setup.hparams}
    return {**spec, "search": None}


def submit_training(plan: StudyPlan) -> dict[TrainingKey, PrefectFuture[TrainedModel]]:
    """Submits one train task per training key, without waiting for any.

    Submit every training before any evaluation: a task runner resolves a task's upstream
    futures in a bounded pool of threads, so evaluations queued first would hold those threads
    while the trainings they wait for could not even be submitted.
    """
    spec = plan.spec
    on_gpu_pool = trains_on_gpu_pool(spec)
    return {
        (index, seed, target): (
            train_on_pool.submit(GPU_TRAINING, pool_spec(plan, index), index, seed, target)
            if on_gpu_pool
            else train_model.submit(**training_inputs(plan, plan.setups[index], seed, target))
        )
        for index, seed, target in training_keys(plan)
    }


def submit_evaluation(
    plan: StudyPlan, trainings: dict[TrainingKey, PrefectFuture[TrainedModel]]
) -> list[PendingEvaluation]:
    """Submits every (target, shots) evaluation of every trained model, without waiting for any;
    a model trained for one target is evaluated on that target only."""
    spec, prepared = plan.spec, plan.prepared
    device = "auto" if trains_on_gpu_pool(spec) else spec.train.device
    pending = []
    for (index, seed, trained_for), trained in trainings.items():
        setup = plan.setups[index]
        for target in [trained_for] if trained_for else spec.target:
            for shots in spec.episodes.shots:
                evaluation = evaluate_model.submit(
                    setup,
                    trained,
                    prepared.targets[target],
                    shots=shots,
                    queries=spec.episodes.queries,
                    episodes=spec.episodes.eval_episodes,
                    episode_seed=derive_seed(seed, "evaluation", target, shots),
                    device=device,
                )
                pending.append(PendingEvaluation(setup, seed, target, shots, trained, evaluation))
    return pending


@dataclass(frozen=True)
class Logged:
    """What a study logged: a result per evaluation that finished, a message per failure."""

    results: list[Result]
    failures: list[str]


def error_of(future: PrefectFuture[Any]) -> str:
    """Why a task run did not complete: its exception's message, else its state's."""
    outcome = future.result(raise_on_failure=False)
    return str(outcome) if isinstance(outcome, BaseException) else str(future.state.message)


def log_study(plan: StudyPlan, run: StudyRun, pending: list[PendingEvaluation], flow_run_id: str) -> Logged:
    """One MLflow child run per evaluation, in submission order, marked when it reused the cache.

    Each trained model is logged once (a model run the evaluations refer to); a failed training is
    logged as a FAILED model run with its error, and the other trainings' evaluations go on. The
    logging tasks run here, in the flow's thread, as soon as what they log is done: submitted to the
    task runner, they would queue behind every evaluation, and MLflow would show nothing until the
    last one finished.
    """
    models: dict[int, ModelRef | None] = {}  # id of a training's future -> its model (None: it failed)
    failures: list[str] = []
    logged = []
    trainings = {id(item.trained): item.trained for item in pending}.values()
    progress = StudyProgress(plan.spec.name, trainings, [item.evaluation for item in pending])
    with progress:
        for item in pending:
            progress.publish(waiting_on=[item.trained, item.evaluation])  # before waiting on them
            trained_for = item.target if item.setup.uses_unlabelled_target else None
            if id(item.trained) not in models:
                item.trained.wait()
                if item.trained.state.is_completed():
                    model = log_model(run, item.setup, item.trained, item.seed, trained_for)
                else:
                    where = f", target {trained_for}" if trained_for else ""
                    failures.append(
                        f"training {item.setup.label}, seed {item.seed}{where}: {error_of(item.trained)}"
                    )
                    log_failed_training(run, item.setup, item.seed, trained_for, failures[-1])
                    model = None
                models[id(item.trained)] = model
            model = models[id(item.trained)]
            if model is None:
                continue
            item.evaluation.wait()
            if not item.evaluation.state.is_completed():
                where = f"{item.setup.label} seed {item.seed} on {item.target}, {item.shots} shots"
                failures.append(f"evaluating {where}: {error_of(item.evaluation)}")
                continue
            state = log_evaluation(
                run,
                plan.spec,
                item.setup,
                item.trained,
                item.evaluation,
                seed=item.seed,
                target=item.target,
                shots=item.shots,
                flow_run_id=flow_run_id,
                modality=plan.prepared.modality,
                cached=item.evaluation.state.name == "Cached",
                model=model,
                search_tags=plan.searches[item.setup.label].tags()
                if item.setup.label in plan.searches
                else None,
                return_state=True,  # a failure is raised below, once the others are logged
            )
            error = state.result(raise_on_failure=False) if state.is_failed() else None
            stopped = interruption_behind(error) if isinstance(error, BaseException) else None
            if stopped is not None:  # an interruption the log task's error replaced: stop now
                raise stopped
            logged.append(state)
    return Logged([state.result() for state in logged], failures)


def evaluate_and_report(
    plan: StudyPlan,
    run: StudyRun,
    trainings: dict[TrainingKey, PrefectFuture[TrainedModel]],
    flow_run_id: str,
) -> list[dict[str, Any]]:
    """Evaluates the trained models, logs every run, reports the table; returns its rows. Raises, once
    everything that finished is logged, if a training or an evaluation failed."""
    logged = log_study(plan, run, submit_evaluation(plan, trainings), flow_run_id)
    summary = report_study(run, plan.spec, logged.results) if logged.results else None
    if logged.failures or summary is None:
        raise failed(plan.spec, logged)
    return summary.to_dict(orient="records")


def failed(spec: StudySpec, logged: Logged) -> StudyError:
    """The error a study with failures ends with, once everything else is logged."""
    causes = "\n".join(f"  {failure}" for failure in logged.failures)
    return StudyError(
        f"study {spec.name!r}: {len(logged.failures)} failure(s), recorded as FAILED runs in MLflow; "
        f"{len(logged.results)} evaluations finished and were logged:\n{causes}"
    )


def end(run: StudyRun, status: str, attempts: int = 6) -> None:
    """Ends the MLflow run with `status` unless it has ended already.

    Transient errors are retried: an interruption can land inside one of this process's own writes to
    a sqlite store, whose connection then holds the database lock until it is garbage-collected
    ("database is locked" here, seen in CI), so each retry collects garbage first."""
    for attempt in range(attempts):
        try:
            if run.client.get_run(run.run_id).info.status == "RUNNING":
                run.client.set_terminated(run.run_id, status)
            return
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            gc.collect()
            time.sleep(0.5 * 2**attempt)


@contextmanager
def ended_if_stopped(run: StudyRun) -> Iterator[None]:
    """Ends the MLflow parent run (unless it has ended) FAILED if the block raises, KILLED if it is
    interrupted (Ctrl-C, SIGTERM, SIGHUP), also when a clean-up's error replaced the interruption
    (`interruption_behind`): the interruption is raised again, so that the user sees it, not a
    traceback. A SIGKILLed study's run is ended KILLED by the next study. An interruption also asks
    the tasks running in threads of this process to stop (tasks/stopping.py): Prefect's engine waits
    for them before it lets the interruption end the process."""
    STOP_REQUESTED.clear()
    try:
        yield
    except BaseException as error:
        interruption = error if not isinstance(error, Exception) else interruption_behind(error)
        if interruption is None:
            end(run, "FAILED")
            raise
        STOP_REQUESTED.set()
        release_frames(error)
        try:
            end(run, "KILLED")
        except Exception as exc:  # the interruption is what the user must see; the next study ends it
            warnings.warn(f"MLflow run {run.run_id} could not be ended KILLED: {exc}", stacklevel=1)
        if interruption is error:
            raise
        raise interruption  # noqa: B904 (its context is the clean-up's error)


@contextmanager
def terminating(run: StudyRun) -> Iterator[None]:
    """`ended_if_stopped`, and FINISHED when the block completes (unless the block ended the run)."""
    with ended_if_stopped(run):
        yield
    end(run, "FINISHED")


def start_study(plan: StudyPlan, tracking_uri: str, tags: dict[str, str]) -> StudyRun:
    """Opens the study's MLflow parent run, owned by this process, with the dataset inputs and linked
    from the Prefect flow run, and ends the runs of dead studies. Once the run exists, a failure or
    an interruption ends it before propagating."""
    datasets = study_datasets(plan.spec, plan.prepared.fingerprint, plan.prepared.rows_per_domain)
    tags = {**tags, OWNER_TAG: owner()}
    run = start_study_run(plan.spec, tracking_uri, tags, datasets, plan.prepared.modality)
    with ended_if_stopped(run):
        link_mlflow_run(run, plan.spec)
        end_stale_runs(run.client, run.experiment_id)
    return run


class StudyProcessPool(ProcessPoolTaskRunner):
    """Prefect's process pool, except that an interrupted study (SIGTERM, Ctrl-C) stops its worker
    processes at once: Prefect's pool waits for the running tasks, and a training can take an hour.
    Nothing is lost: trainings checkpoint, so a rerun resumes them."""

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception) and self._executor is not None:
            # concurrent.futures keeps its worker processes in `_processes`; no public API lists them
            for worker in list(getattr(self._executor, "_processes", {}).values()):
                worker.terminate()
        super().__exit__(exc_type, exc_value, traceback)


def processes(workers: int | None = None) -> StudyProcessPool:
    """`workers` processes (default: PREFECT_TASKS_RUNNER_PROCESS_POOL_MAX_WORKERS, else the CPU count),
    each with cores // workers torch threads, so that the workers together use every core once
    instead of each starting as many threads as the machine has cores."""
    workers = workers or get_current_settings().tasks.runner.process_pool_max_workers or os.cpu_count() or 1
    threads = max(1, (os.cpu_count() or 1) // workers)
    # Prefect starts the workers with `spawn` and runs this initializer once in each, before any task
    return StudyProcessPool(max_workers=workers, initializer=start_worker, initargs=(threads,))


def start_worker(threads: int) -> None:
    """A task-runner process's set-up: its share of the cores, glibc's allocator, the CLI's quiet
    console, and no Ctrl-C of its own. A terminal's Ctrl-C signals the whole process group; a worker
    interrupted midway through a pool call left the pool's queues locked and the study process hung at
    exit, so the study process alone takes the interruption and stops its workers (StudyProcessPool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()  # before the worker's threads exist: see tasks/allocator.py
    torch.set_num_threads(threads)
    settings.quiet_if_asked()


def task_runner(workers: int, address: str | None = None) -> TaskRunner[Any]:
    """The runner `adaptflow run` gives a study: the Dask cluster at `address` if given, else `workers`
    local processes; one worker keeps today's single in-process thread. Every task seeds torch
    itself, so where and in which order tasks run does not change the numbers."""
    if address is not None:
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise StudyError("--task-runner dask needs prefect-dask: pip install -e '.[dask]'") from exc
        return DaskTaskRunner(address=address)
    return ThreadPoolTaskRunner(max_workers=1) if workers == 1 else processes(workers)


# One worker thread: torch's random generator is global to the process, so tasks that seed it
# must not interleave in threads. `adaptflow run` picks processes or Dask with `task_runner`.
@flow(
    name="study",
    flow_run_name=study_run_name,
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=1),
)
def study(
    spec: str | dict[str, Any] = "studies/demo.yaml",
    overrides: list[str] | None = None,
    tracking_uri: str | None = None,
) -> list[dict[str, Any]]:
    """Runs one study spec (a YAML path or an inline mapping); returns the summary table rows."""
    tracking_uri = tracking_store(tracking_uri)  # a server that is down fails the study here
    plan = plan_study(load_spec(spec, overrides or []))
    flow_run_id = str(flow_run.id)
    run = start_study(plan, tracking_uri, {"prefect_flow_run_id": flow_run_id})
    with terminating(run):
        plan = searched(plan, run)
        return evaluate_and_report(plan, run, submit_training(plan), flow_run_id)
