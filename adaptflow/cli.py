"""The `adaptflow` command: run, validate or evaluate a study spec, compare runs, open the UIs."""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import NoReturn
from urllib.parse import quote, urlsplit

from adaptflow import settings
from adaptflow.errors import StudyError
from adaptflow.redact import has_secret, redact
from adaptflow.spec import StudySpec, load_spec

INTERRUPTED = 130  # the shell's status for a command ended by SIGINT
EXIT_GRACE_SECONDS = 15.0  # the longest an interrupted command waits for its own exit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="adaptflow", description="Few-shot domain-adaptation studies on Prefect and MLflow."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run a study spec end to end (prepare, train, evaluate, report)"),
        ("validate", "check a study spec and its data without training"),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("spec", help="path of a YAML study spec (see studies/)")
        command.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY.PATH=VALUE",
            help="override a spec value, e.g. --set train.steps=50 (repeatable)",
        )
        if name == "run":
            command.add_argument(
                "--tracking-uri",
                default=None,
                help="MLflow URI, or prefect-secret:NAME to read it from that Prefect Secret block (default: "
                "$MLFLOW_TRACKING_URI, else mlflow.db in $ADAPTFLOW_HOME or .)",
            )
            command.add_argument(
                "--workers",
                type=int,
                default=1,
                metavar="N",
                help="run the study's tasks in N local processes of cores/N torch threads each; 1 (the "
                "default) runs them one at a time in this process (docs/orchestration.md says when more "
                "pays). Numbers do not depend on N",
            )
            command.add_argument(
                "--task-runner",
                choices=["local", "dask"],
                default="local",
                help="'local' (default): --workers processes here; 'dask': the tasks run on the existing "
                "Dask cluster at --address (needs the dask extra; its workers need this project)",
            )
            command.add_argument(
                "--address", default=None, help="Dask scheduler address, e.g. tcp://host:8786"
            )
            command.add_argument(
                "--verbose",
                action="store_true",
                help="print every task's log lines (by default the terminal shows flow-level lines and task "
                "warnings; the Prefect UI has every line either way)",
            )
    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a saved model on a spec's targets, without training",
        description="Adapts the model saved by a study (its model run, or a version of the study's "
        "registered model) to the episodes of SPEC's targets and scores their queries, logged as a new "
        "study run. With the study's own spec it meets the same episodes and scores the same accuracies; "
        "the spec's data and source domains decide the preprocessing, so keep them to evaluate the model "
        "as its study prepared its inputs.",
    )
    evaluate.add_argument(
        "model_uri",
        help="models:/<model id> (an evaluation run's model_uri tag), runs:/<model run id> or "
        "models:/<study>/<version>",
    )
    evaluate.add_argument(
        "--spec", required=True, help="the study spec whose data, targets and episodes to use"
    )
    evaluate.add_argument("--target", nargs="+", default=None, help="target domains (default: the spec's)")
    evaluate.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a spec value (repeatable)",
    )
    evaluate.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI or prefect-secret:NAME (default as for run)"
    )
    evaluate.add_argument("--verbose", action="store_true", help="print every task's log lines")
    compare = commands.add_parser(
        "compare",
        help="compare an experiment's runs: seed-aware 95%% CIs, corrected paired tests, ranks, plots",
        description="Reads the experiment's child runs from MLflow (the latest per algorithm, source, "
        "target, shots and seed) and prints accuracy with seed-aware 95% intervals (seeds are the "
        "replicates), paired tests against a baseline with Holm-Bonferroni correction, and average ranks "
        "with Friedman's test; writes them with plots to --out (also logged to the latest study run). "
        "docs/statistics.md explains the methods.",
    )
    compare.add_argument(
        "experiment",
        nargs="+",
        help="MLflow experiment name (the spec's `name`); several are compared together, e.g. a spec's "
        "defaults and its search run under two names (outputs are logged to the first)",
    )
    compare.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI or prefect-secret:NAME (default as for run)"
    )
    compare.add_argument(
        "--format",
        default="table",
        choices=["table", "markdown", "csv", "latex"],
        help="output format of the tables (default: table); csv prints the tidy summary only",
    )
    compare.add_argument(
        "--by",
        default="algorithm,target_domain,shots",
        help="grouping: algorithm first (rows), then any of target_domain, shots, seed, source_domains",
    )
    compare.add_argument(
        "--per-seed",
        action="store_true",
        help="group by seed as well: each seed's mean per cell with its episode interval (instead of "
        "the seed-aware interval), to see the spread behind the intervals",
    )
    compare.add_argument("--baseline", default="finetune", help="algorithm the others are tested against")
    compare.add_argument(
        "--study",
        default="all",
        help="'all' study runs of the experiment (latest result per cell), 'latest' (of each experiment), "
        "or a parent run id",
    )
    compare.add_argument("--out", default="reports", help="folder for the table and plots (default reports/)")
    ui = commands.add_parser(
        "ui",
        help="open the results: MLflow's and Prefect's UIs on the project's stores, until Ctrl-C",
        description="Starts the MLflow UI on the project's tracking store and the Prefect UI on its "
        "PREFECT_HOME, on free loopback ports (5000 and 4200 when free), waits until both answer and "
        "prints the pages of the latest study. Ctrl-C stops both.",
    )
    ui.add_argument("--study", default=None, help="experiment (the spec's `name`) to open (default: latest)")
    ui.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI or prefect-secret:NAME (default as for run)"
    )
    args = parser.parse_args(argv)
    if args.command == "run" and args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.command == "run" and (args.task_runner == "dask") != (args.address is not None):
        parser.error("--task-runner dask and --address tcp://HOST:PORT go together")
    try:
        if args.command == "validate":
            return _validate(args.spec, args.overrides)
        if args.command == "compare":
            return _compare(args)
        if args.command == "ui":
            return _ui(args.study, _tracking_uri(args.tracking_uri))
        if args.command == "evaluate":
            targets = [f"target=[{', '.join(args.target)}]"] if args.target else []
            return _run(
                args.spec,
                [*args.overrides, *targets],
                args.tracking_uri,
                model_uri=args.model_uri,
                verbose=args.verbose,
            )
        return _run(
            args.spec, args.overrides, args.tracking_uri, args.workers, args.address, verbose=args.verbose
        )
    except StudyError as exc:
        print(f"adaptflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM or SIGHUP through _interrupt
        resumes = " What finished is kept; the same command again resumes." if args.command == "run" else ""
        print(f"\nadaptflow: interrupted.{resumes}", file=sys.stderr)
        return INTERRUPTED


def _validate(spec_path: str, overrides: list[str]) -> int:
    spec = _load(spec_path, overrides)  # before the heavy imports: see _load
    from flows.study import validate_study

    prepared = validate_study(spec)
    classes = len(prepared.class_names)
    print(f"{spec_path}: valid. {classes} classes; rows per domain: {prepared.rows_per_domain}")
    print(
        f"source pools: {len(prepared.source_train)} training / {len(prepared.source_val)} validation rows; "
        f"{len(spec.algorithms)} algorithms x {len(spec.seeds)} seeds x {len(spec.target)} targets "
        f"x {len(spec.episodes.shots)} shot counts = "
        f"{len(spec.algorithms) * len(spec.seeds) * len(spec.target) * len(spec.episodes.shots)} evaluations"
    )
    if spec.search is not None:
        search = spec.search
        print(
            f"search first: {search.trials} trials x {len(spec.algorithms)} algorithms, {search.sampler} "
            f"sampler, {search.pruner} pruner, chosen by {search.selection} (source data only)"
        )
    return 0


def _load(spec_path: str, overrides: list[str]) -> StudySpec:
    """The spec with its overrides, its data paths, columns and domain names checked.

    Called before Prefect and MLflow are imported, each check after only what it needs, so that a
    spec or data-file error is reported in a second or three rather than ten: first what needs
    neither PyTorch nor `datasets` (`_precheck`), then the rest (`_check_components`)."""
    _precheck(spec_path, overrides)
    return _check_components(spec_path, overrides)


def _precheck(spec_path: str, overrides: list[str]) -> None:
    """The spec's checks that need neither PyTorch nor `datasets` (a fraction of a second): its
    fields, a credential in an override (refused by `validate` and `run` alike, since `run` hands
    overrides to Prefect, which stores them as flow parameters), local paths and Parquet columns."""
    secret = [repr(redact(item)) for item in overrides if has_secret(item)]
    if secret:
        raise StudyError(
            f"--set {', '.join(secret)}: a --set value holds a credential, and Prefect would store it as a "
            "flow parameter. Put the value in the spec file, or the credential in the environment "
            "(e.g. HF_TOKEN, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD)."
        )
    from tasks.loading import check_local_paths, check_parquet_columns

    spec = load_spec(spec_path, overrides, components=False)  # all but what needs PyTorch
    domains = [*spec.source, *spec.target]
    check_local_paths(spec.data, domains)  # a mistyped local path, before anything heavy loads
    check_parquet_columns(spec.data, domains)  # columns and domain names of local Parquet: pyarrow


def _check_components(spec_path: str, overrides: list[str]) -> StudySpec:
    """The spec with the algorithms' hyperparameters checked (PyTorch), and the columns and domain
    names of any data source (`datasets`)."""
    from tasks.loading import load_domains

    spec = load_spec(spec_path, overrides)
    load_domains(spec.data, [*spec.source, *spec.target])
    return spec


def _run(
    spec_path: str,
    overrides: list[str],
    tracking_uri: str | None,
    workers: int = 1,
    address: str | None = None,
    model_uri: str | None = None,
    verbose: bool = False,
) -> int:
    """Runs the study of a spec; with `model_uri`, evaluates that saved model on the spec's targets."""
    from tasks.allocator import keep_freed_memory

    keep_freed_memory()  # before Prefect starts the threads that run tasks: see tasks/allocator.py
    _precheck(spec_path, overrides)  # before the heavy imports, and before a server starts: see _load
    from prefect.settings import get_current_settings

    from flows.server import launched_for, shared_prefect_server

    running = None if get_current_settings().api.url else _ui_prefect_api()
    uri = tracking_uri or settings.default_tracking_uri()
    # the server boots on another core while the study imports PyTorch and the rest and checks the
    # spec and data; a tracking URI kept in a Prefect Secret is read from Prefect during the checks,
    # so then Prefect starts it as it needs it
    with launched_for(running is None and not uri.startswith(settings.SECRET_PREFIX)):
        spec = _check_components(spec_path, overrides)
        from flows.evaluate import evaluate_saved_model
        from flows.study import study, task_runner, validate_study
        from tasks.report import format_table
        from tasks.stopping import interruption_behind
        from tasks.summary import interval_caption
        from tasks.tracking import check_reachable, open_store

        if not verbose:
            settings.quiet_task_logs()  # after the imports above, which set up Prefect's console handler

        store = _tracking_uri(uri)
        check_reachable(store)  # a tracking server that is down fails here, before data loads
        validate_study(spec)  # fail fast, before a flow runs or MLflow is touched
        # while the server boots: MLflow checks a local store's schema (about 1 s) and keeps the store
        # for the flow's tasks in this process
        open_store(store)
    if has_secret(uri):  # Prefect stores flow parameters: a URI with credentials goes by the environment
        os.environ["MLFLOW_TRACKING_URI"] = uri
    started = time.perf_counter()
    flow_uri = None if has_secret(uri) else uri
    if running is not None:
        print(f"adaptflow: using the Prefect server of `adaptflow ui`, {running}", file=sys.stderr)
    try:
        with _sigterm_interrupts(), shared_prefect_server(running):
            if model_uri is None:
                rows = study.with_options(task_runner=task_runner(workers, address))(
                    spec=str(Path(spec_path)), overrides=overrides, tracking_uri=flow_uri
                )
            else:
                rows = evaluate_saved_model(model_uri, str(Path(spec_path)), overrides, flow_uri)
    except Exception as exc:  # Prefect's own clean-up after an interruption can fail in its place
        if interruption_behind(exc) is None:
            raise
        raise KeyboardInterrupt from exc
    import pandas as pd

    print(f"\n{spec.name}: {spec.protocol()}")
    summary = pd.DataFrame(rows)
    print(f"{interval_caption(summary)}:\n")
    print(format_table(summary))
    what = "study" if model_uri is None else "evaluation"
    print(f"\n{what} took {time.perf_counter() - started:.1f} s. Open the results in MLflow and Prefect:")
    store = "" if uri == settings.default_tracking_uri() else f" --tracking-uri {shlex.quote(redact(uri))}"
    print(f"  {_adaptflow_command()} ui --study {shlex.quote(spec.name)}{store}")
    return 0


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP (the terminal closed) as Ctrl-C while a flow runs: Prefect's flow engine
    hands a SIGTERM on to this handler once it has marked the flow run, so the process exits through
    its `finally` blocks and atexit, which stop the temporary Prefect server (in a process group of its
    own, so no signal to the terminal's group reaches it), instead of dying and leaving the server
    behind. Once the flow has ended (Prefect has waited for its tasks), an interruption's stop request
    is withdrawn, so that what runs next in this process (`main()` called again) is not stopped by it."""
    from tasks.stopping import STOP_REQUESTED

    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        STOP_REQUESTED.clear()


def _tracking_uri(given: str | None) -> str:
    """The URI to connect to; `prefect-secret:NAME` is read from Prefect (imported only for it)."""
    if given is None or not given.startswith(settings.SECRET_PREFIX):
        return given or settings.default_tracking_uri()
    from tasks.tracking import resolve_tracking_uri

    return resolve_tracking_uri(given)


def _adaptflow_command() -> str:
    """This environment's `adaptflow`, relative to the working folder when inside it: it works
    whether or not the virtual environment is activated."""
    command = Path(sys.executable).parent / "adaptflow"
    return str(command.relative_to(Path.cwd())) if command.is_relative_to(Path.cwd()) else str(command)


def _compare(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from tasks.compare import compare, render, write_outputs

    client = MlflowClient(tracking_uri=_tracking_uri(args.tracking_uri))
    by = args.by.split(",") + (["seed"] if args.per_seed and "seed" not in args.by else [])
    comparison = compare(client, args.experiment, args.baseline, by, args.study)
    print(render(comparison, args.format))
    files = write_outputs(client, args.experiment[0], comparison, args.format, Path(args.out))
    print("\nwritten: " + ", ".join(str(path) for path in files))
    return 0


LOOPBACK = "127.0.0.1"
# where a running `adaptflow ui` leaves the API URL of the Prefect server it started
UI_PREFECT_API = settings.PROJECT_DIR / ".cache" / "ui" / "prefect-api.json"
UI_STARTUP_SECONDS = 120  # a cold Prefect server takes 13-17 s here, more on a busy machine
# Prefect 3.9's default UI: its root redirects there, but deep links without it open the old UI
PREFECT_UI_BASE = "/v2"


def _ui(study: str | None, tracking_uri: str) -> int:
    """Serves MLflow's and Prefect's UIs for the project's stores until Ctrl-C or SIGTERM.

    A store that is already a server (an http tracking URI, PREFECT_API_URL) is linked, not started.
    Executables come from this interpreter's environment, so no virtual environment needs to be
    activated; each server runs in its own session, so stopping its process group stops its workers.
    """
    # SIGINT too: a shell may start it with SIGINT ignored; SIGHUP: its terminal was closed
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, _interrupt)
    logs = settings.PROJECT_DIR / ".cache" / "ui"
    logs.mkdir(parents=True, exist_ok=True)
    servers: list[subprocess.Popen[bytes]] = []
    mlflow = settings.mlflow_ui_url(tracking_uri)
    prefect = os.environ.get("PREFECT_API_URL", "").rstrip("/").removesuffix("/api")
    try:
        if urlsplit(tracking_uri).scheme not in ("http", "https"):
            port = _free_port(urlsplit(mlflow).port or 5000)
            mlflow = f"http://{LOOPBACK}:{port}"
            command = ["mlflow", "server", "--host", LOOPBACK, "--port", str(port), "--workers", "1"]
            environment = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            servers.append(_serve([*command, "--backend-store-uri", tracking_uri], environment, logs))
        if not prefect:
            port = _free_port(int(os.environ.get("PREFECT_SERVER_API_PORT", "4200")))
            prefect = f"http://{LOOPBACK}:{port}"
            api = {"PREFECT_API_URL": f"{prefect}/api", "PREFECT_UI_API_URL": f"{prefect}/api"}
            # a viewer: no scheduler or other services that would act on the project's deployments
            command = ["prefect", "server", "start", "--host", LOOPBACK, "--port", str(port), "--no-services"]
            servers.append(_serve(command, api, logs))
        pages = _study_pages(tracking_uri, study, redact(mlflow), prefect)  # printed: no credentials
        _wait_until_up(servers, [f"{mlflow}/health", f"{prefect}/api/health"], logs)
        print("\n".join(pages), flush=True)
        if not servers:
            return 0
        if "PREFECT_API_URL" not in os.environ:  # started here: `adaptflow run` may use it meanwhile
            state = {"api": f"{prefect}/api", "pid": os.getpid(), "prefect_home": os.environ["PREFECT_HOME"]}
            UI_PREFECT_API.write_text(json.dumps(state))
            print("Studies run meanwhile use this Prefect server (no start-up of their own).")
        print("Ctrl-C stops them.", flush=True)
        while all(server.poll() is None for server in servers):
            time.sleep(0.5)
        raise StudyError(f"a UI server stopped on its own; its log is in {logs}")
    except KeyboardInterrupt:
        return 0
    finally:
        for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # nor a second signal leave a server
            signal.signal(stop, signal.SIG_IGN)
        UI_PREFECT_API.unlink(missing_ok=True)
        for server in servers:
            _stop(server)


def _ui_prefect_api() -> str | None:
    """The API URL of the Prefect server a running `adaptflow ui` of this project serves: a study run
    while the UI is open uses it instead of starting a temporary server (~3 s), and shows in the UI
    as it runs. Only if that `adaptflow ui` is alive, serves this PREFECT_HOME and its server answers."""
    try:
        state = json.loads(UI_PREFECT_API.read_text())
        os.kill(state["pid"], 0)
    except (OSError, ValueError, KeyError, TypeError):  # none, unreadable, or its process is gone
        return None
    if state.get("prefect_home") != os.environ.get("PREFECT_HOME"):
        return None
    return state["api"] if _answers(f"{state['api']}/health", timeout=1) else None


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM or SIGHUP acts as Ctrl-C: the `finally` blocks that stop servers and workers run."""
    raise KeyboardInterrupt


def _free_port(preferred: int) -> int:
    """`preferred` if it is free on the loopback address, else a free port the system picks."""
    with socket.socket() as probe:
        try:
            probe.bind((LOOPBACK, preferred))
        except OSError:
            probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _serve(command: list[str], environment: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    """Starts this environment's `command` in its own session, its output in logs/<name>.log."""
    executable = str(Path(sys.executable).parent / command[0])
    with (logs / f"{command[0]}.log").open("wb") as log:
        return subprocess.Popen(
            [executable, *command[1:]],
            env={**os.environ, **environment},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_until_up(servers: list[subprocess.Popen[bytes]], health: list[str], logs: Path) -> None:
    """Returns once every health URL answers 200; raises if a server exits or time runs out."""
    deadline = time.monotonic() + UI_STARTUP_SECONDS
    waiting = list(health)
    while waiting:
        if any(server.poll() is not None for server in servers):
            raise StudyError(f"a UI server exited while starting; its log is in {logs}")
        if time.monotonic() > deadline:
            raise StudyError(f"{', '.join(waiting)} did not answer in {UI_STARTUP_SECONDS} s; logs in {logs}")
        waiting = [url for url in waiting if not _answers(url)]
        time.sleep(0.5 if waiting else 0)


def _answers(url: str, timeout: float = 5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after 15 s."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    except ProcessLookupError:  # the group is gone already
        server.wait()


def _study_pages(tracking_uri: str, study: str | None, mlflow: str, prefect: str) -> list[str]:
    """The lines `adaptflow ui` prints: the study's runs table, its latest parent run, its models, its
    flow runs
    and the latest one. The study is `study` (an experiment name) or the latest of any."""
    database = tracking_uri.removeprefix("sqlite:///")
    if database != tracking_uri and not Path(database).exists():
        return [f"MLflow   {mlflow}", f"Prefect  {prefect}", "no study yet: run `adaptflow run SPEC` first"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = {e.experiment_id: e.name for e in client.search_experiments(max_results=50000)}
    if study is not None:
        experiments = {key: name for key, name in experiments.items() if name == study}
        if not experiments:
            raise StudyError(f"no experiment {study!r} in {tracking_uri}: run its spec first (its `name`)")
    runs = client.search_runs(
        list(experiments), "tags.kind = 'study'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        return [f"MLflow   {mlflow}", f"Prefect  {prefect}", "no study yet: run `adaptflow run SPEC` first"]
    experiment, run_id = runs[0].info.experiment_id, runs[0].info.run_id
    name = experiments[experiment]
    lines = [
        f"MLflow   {settings.mlflow_page(mlflow, experiment)}",
        f"         latest run of {name}: {settings.mlflow_page(mlflow, experiment, run_id)}",
        f"         its models: {settings.mlflow_page(mlflow, experiment, tab='models')}",
        f"Prefect  {prefect}{PREFECT_UI_BASE}/runs?flow-run-search={quote(name)}",
    ]
    flow_run = runs[0].data.tags.get("prefect_flow_run_id")
    return lines + (
        [f"         its flow run: {prefect}{PREFECT_UI_BASE}/runs/flow-run/{flow_run}?tab=Artifacts"]
        if flow_run
        else []
    )


def command() -> NoReturn:
    """The `adaptflow` executable: `main`, then an exit that skips Python's last garbage collection over
    every object torch, Prefect and MLflow created, which took 1.3 s of each command (docs/benchmarks.md).
    The process frees that memory anyway; atexit handlers (the temporary server's stop, Prefect's log
    flush) still run."""
    status = main()
    gc.freeze()
    if status == INTERRUPTED:
        _leave_within(EXIT_GRACE_SECONDS, status)
    raise SystemExit(status)


def _leave_within(seconds: float, status: int) -> None:
    """After an interruption, exits with `status` at most `seconds` from now, even if Python's exit
    (joining the task runner's threads, the atexit handlers) is blocked: an interrupted `--workers 2`
    study once printed "interrupted" and then never exited, and the cause was not found. What finished
    is stored by then, and the temporary server stops with this process (its parent-death signal); the
    threads' stacks are printed for a bug report. The timer is Python code: a thread holding the
    interpreter's lock would stop it, so faulthandler's own watchdog (C, exit status 1) backs it up
    5 s later, until the interpreter's last teardown."""

    def leave() -> None:
        try:
            print(
                f"adaptflow: still not exited {seconds:.0f} s after the interruption; leaving now. "
                "Please report this with the threads' stacks below.",
                file=sys.stderr,
                flush=True,
            )
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stdout.flush()
        finally:
            os._exit(status)

    timer = threading.Timer(seconds, leave)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(seconds + 5, exit=True)


if __name__ == "__main__":
    command()
