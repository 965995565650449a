"""What do Prefect and MLflow cost a study? The demo's exact work timed bare, then as `adaptflow run`.

1. bare: this process prepares the data and runs every training and evaluation of the spec (the
   study flow's own plan: `check_study`, `training_keys`, `training_inputs`, the same seeds) one
   after another, with no Prefect run and no MLflow. Evaluation is `evaluate_model.fn`; training is
   the body of `train_model` without its Prefect logger, progress artifact and checkpoint store (it
   cannot run outside a task run), i.e. the same `source_episodes` and `meta_train` calls.
2. fresh: `adaptflow run SPEC --workers N` in a subprocess with a new ADAPTFLOW_HOME (no
   prepared-data cache, no task cache: a study's first run) and a cold temporary Prefect server; wall
   time of the whole command. The project's Prefect database and MLflow store are created first and
   timed apart, as a project's first command creates them once (a subprocess: 13-15 s here with its
   own start and the server's stop; a server on a new Prefect database answers about 5 s later than
   on an existing one, after its schema migrations); `--new-project` leaves them to the fresh run.
3. cached: the same command again: every task is a cache hit; what is left is orchestration.

Bare prepares the data without the prepared-data cache too, so both start from the Parquet files.
Both also report the time in training and in evaluation (in the flow: the `train_seconds` and
`eval_seconds` each task logged), which tells slower work inside the tasks from the orchestration
between them.

The overhead share is (fresh - bare) / fresh. Every accuracy logged by the flow must equal the bare
one for its (algorithm, seed, target, shots); the script says whether they do. Run from the project
folder (the machine's load average is printed next to each number):

    .venv/bin/python benchmarks/overhead.py --workers 1
    .venv/bin/python benchmarks/overhead.py --workers 2
    .venv/bin/python benchmarks/overhead.py --set train.steps=3000   # a study with 10x the training
    .venv/bin/python benchmarks/overhead.py --new-project   # the fresh run creates the stores too
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from adaptflow.spec import load_spec  # noqa: E402
from flows.study import StudyPlan, check_study, training_inputs, training_keys  # noqa: E402
from metalib import meta_train  # noqa: E402
from metalib.device import resolve_device  # noqa: E402
from metalib.seeding import derive_seed  # noqa: E402
from tasks.allocator import keep_freed_memory  # noqa: E402
from tasks.evaluate import evaluate_model  # noqa: E402
from tasks.prepare import prepare  # noqa: E402
from tasks.train import TrainedModel, source_episodes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (algorithm label, seed, target, shots) -> accuracy
Accuracies = dict[tuple[str, str, str, str], float]


def checkout() -> str:
    """The commit this checkout is at, and whether its tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    changed = " with uncommitted changes" if git("status", "--short", "--untracked-files=no") else ""
    return f"commit {git('rev-parse', '--short', 'HEAD') or '?'}{changed}"


def load() -> str:
    return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def train(plan: StudyPlan, index: int, seed: int, target: str | None) -> TrainedModel:
    """`train_model`'s work for one training key, without Prefect."""
    inputs = training_inputs(plan, plan.setups[index], seed, target)
    setup, spec = inputs["setup"], inputs["train"]
    device = resolve_device(spec.device)
    torch.manual_seed(derive_seed(seed, "init"))
    learner = setup.build().to(device)
    if inputs["unlabelled_target"] is not None:
        learner.set_unlabelled_target(inputs["unlabelled_target"].to(device))
    sampler, validation = source_episodes(
        setup, inputs["source_train"], inputs["source_val"], inputs["shots"], inputs["queries"], spec, seed
    )
    history = meta_train(
        learner,
        sampler,
        steps=spec.steps,
        meta_batch=spec.meta_batch,
        validation=validation,
        val_every=spec.val_every,
        device=device,
        progress=False,  # no progress bars in the log
    )
    state = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in learner.state_dict().items()}
    return TrainedModel(state, history, 0.0)


def children_cpu() -> float:
    """CPU seconds of the finished subprocesses, with everything they started and waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bare(spec_path: Path, overrides: list[str]) -> tuple[float, float, Accuracies, float, float]:
    """Wall and CPU seconds and the accuracies of the spec's whole work in this process, one task
    after another, and the seconds spent training and evaluating."""
    keep_freed_memory()  # as the train and evaluate tasks do
    started, cpu = time.perf_counter(), time.process_time()
    spec = load_spec(spec_path, overrides)
    plan = check_study(spec, prepare(spec.data, spec.source, spec.target, cache=None))
    spec = plan.spec
    accuracies: Accuracies = {}
    training_s = evaluation_s = 0.0
    for index, seed, trained_for in training_keys(plan):
        setup = plan.setups[index]
        began = time.perf_counter()
        trained = train(plan, index, seed, trained_for)
        training_s += time.perf_counter() - began
        began = time.perf_counter()
        for target in [trained_for] if trained_for else spec.target:
            for shots in spec.episodes.shots:
                evaluation = evaluate_model.fn(
                    setup,
                    trained,
                    plan.prepared.targets[target],
                    shots=shots,
                    queries=spec.episodes.queries,
                    episodes=spec.episodes.eval_episodes,
                    episode_seed=derive_seed(seed, "evaluation", target, shots),
                    device=spec.train.device,
                )
                accuracies[(setup.label, str(seed), target, str(shots))] = evaluation.acc
        evaluation_s += time.perf_counter() - began
    return time.perf_counter() - started, time.process_time() - cpu, accuracies, training_s, evaluation_s


# A project's first command creates the Prefect database (the temporary server's migrations) and the
# MLflow store; this does only that.
CREATE_STORES = """
import sys
from flows.server import shared_prefect_server
from tasks.tracking import open_store
open_store(sys.argv[1])
with shared_prefect_server():
    pass
"""


def environment_of(home: Path) -> dict[str, str]:
    """A project folder of its own, with the embedded temporary server, as for a user."""
    environment = {**os.environ, "ADAPTFLOW_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    environment.pop("PREFECT_API_URL", None)
    return environment


def create_stores(home: Path) -> float:
    """Wall seconds to create the project's Prefect database and MLflow store, in a subprocess."""
    started = time.perf_counter()
    command = [sys.executable, "-c", CREATE_STORES, f"sqlite:///{home / 'mlflow.db'}"]
    done = subprocess.run(command, cwd=ROOT, env=environment_of(home), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"creating the stores failed:\n{done.stderr}")
    return time.perf_counter() - started


def adaptflow_run(
    spec_path: Path, overrides: list[str], workers: int, home: Path, log: Path
) -> tuple[float, float, float]:
    """Wall seconds of `adaptflow run` (the whole command), the study time it printed, and the CPU
    seconds of it, its Prefect server and its workers (a machine shared with other jobs inflates
    wall times, CPU seconds much less)."""
    command = [  # this checkout's code (the folder is first on the path of `-m`), as `adaptflow` runs it
        *(sys.executable, "-m", "adaptflow.cli"),
        *("run", str(spec_path), "--workers", str(workers)),
        *(f"--set={override}" for override in overrides),
        *("--tracking-uri", f"sqlite:///{home / 'mlflow.db'}"),
    ]
    started, cpu = time.perf_counter(), children_cpu()
    with log.open("w") as output:
        subprocess.run(
            command, cwd=ROOT, env=environment_of(home), stdout=output, stderr=subprocess.STDOUT, check=True
        )
    wall, cpu = time.perf_counter() - started, children_cpu() - cpu
    study = re.findall(r"study took ([\d.]+) s", log.read_text())
    return wall, float(study[-1]), cpu


def runs_of(home: Path, experiment: str, kind: str) -> list[Run]:
    """The runs tagged `kind` (model, evaluation) in the benchmark's store, of every study run."""
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], f"tags.kind = '{kind}'", max_results=10000)


def task_seconds(home: Path, experiment: str) -> tuple[float, float]:
    """Seconds the fresh run's tasks spent training (each model run's `train_seconds`) and evaluating
    (each evaluation run's `eval_seconds`), by their own timers. Called before the cached rerun."""
    training = sum(run.data.metrics["train_seconds"] for run in runs_of(home, experiment, "model"))
    evaluation = sum(run.data.metrics["eval_seconds"] for run in runs_of(home, experiment, "evaluation"))
    return training, evaluation


def logged(home: Path, experiment: str) -> list[tuple[tuple[str, str, str, str], float]]:
    """(key, accuracy) of every evaluation run in the store, of every study run."""
    return [
        (
            (
                run.data.tags["algorithm"],
                run.data.tags["seed"],
                run.data.tags["target_domain"],
                run.data.tags["shots"],
            ),
            run.data.metrics["acc"],
        )
        for run in runs_of(home, experiment, "evaluation")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "studies" / "demo.yaml")
    parser.add_argument("--workers", type=int, default=1, help="adaptflow run --workers (default 1)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="a spec override, as `adaptflow run --set` (repeatable): e.g. a larger study",
    )
    parser.add_argument(
        "--new-project",
        action="store_true",
        help="let the fresh run create the Prefect database and MLflow store (a project's first command)",
    )
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {checkout()}", flush=True)
    print(
        f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads in this "
        f"process; spec {args.spec} {args.overrides}; adaptflow run --workers {args.workers}"
        f"{' in a new project' if args.new_project else ''}",
        flush=True,
    )
    home = Path(tempfile.mkdtemp(prefix="adaptflow-overhead-"))
    try:
        print(f"bare:   start, {load()}", flush=True)
        bare_s, bare_cpu, accuracies, bare_training, bare_evaluation = bare(args.spec, args.overrides)
        print(
            f"bare:   {bare_s:.1f} s, {bare_cpu:.1f} s CPU ({len(accuracies)} evaluations; training "
            f"{bare_training:.1f} s, evaluation {bare_evaluation:.1f} s), {load()}",
            flush=True,
        )
        name = load_spec(args.spec, args.overrides).name
        if not args.new_project:
            took = create_stores(home)
            print(
                f"stores: a subprocess created the Prefect database and MLflow store in {took:.1f} s "
                "(its start-up included; once per project, not counted below)",
                flush=True,
            )
        run = functools.partial(adaptflow_run, args.spec, args.overrides, args.workers, home)
        fresh_s, fresh_study, fresh_cpu = run(home / "fresh.log")
        training, evaluation = task_seconds(home, name)
        print(
            f"fresh:  {fresh_s:.1f} s (study {fresh_study:.1f} s; its tasks: training {training:.1f} s, "
            f"evaluation {evaluation:.1f} s), {fresh_cpu:.1f} s CPU, {load()}",
            flush=True,
        )
        cached_s, cached_study, cached_cpu = run(home / "cached.log")
        print(
            f"cached: {cached_s:.1f} s (study {cached_study:.1f} s), {cached_cpu:.1f} s CPU, {load()}",
            flush=True,
        )
        runs = logged(home, name)
        same = len(runs) == 2 * len(accuracies) and all(accuracies[key] == acc for key, acc in runs)
        wall, cpu = fresh_s - bare_s, fresh_cpu - bare_cpu
        print(
            f"overhead of adaptflow run: {wall:.1f} s wall, {wall / fresh_s:.0%} of the study; "
            f"{cpu:.1f} s CPU, {cpu / fresh_cpu:.0%} of its CPU time; cached rerun {cached_s:.1f} s. "
            f"Accuracies identical to bare: {same}",
            flush=True,
        )
        printed = (home / "fresh.log").read_text().split("study took")[0]
        print(printed[printed.rindex(f"\n{name}: ") :].strip())  # the fresh run's results table
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
