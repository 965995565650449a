"""An interrupted study keeps what it finished, and a rerun resumes instead of starting over."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from adaptflow.cli import main
from tests.conftest import DEMO, ROOT, TINY_TRAINING, cli_overrides, stop
from tests.test_resume import checkpoint_steps

pytestmark = pytest.mark.slow

# 8 evaluations (2 algorithms x 2 targets x 2 shots, one seed: seeds play no part here). finetune's
# 100 episodes of 100 adaptation steps each keep the study busy for long after its first evaluation
# is logged, so the SIGTERM always lands before the last one, even on a loaded machine.
ARGS = cli_overrides(
    *TINY_TRAINING,
    "episodes.eval_episodes=100",
    "seeds=[0]",
    "algorithms=[{name: protonet}, {name: finetune}]",
    "name=interrupted",
)
EVALUATIONS = 8


def evaluation_runs(client: MlflowClient, status: str | None = None) -> list:  # list of mlflow Run
    experiment = client.get_experiment_by_name("interrupted")
    if experiment is None:
        return []
    where = f" and attributes.status = '{status}'" if status else ""
    return client.search_runs([experiment.experiment_id], f"tags.kind = 'evaluation'{where}")


def test_interrupted_run_keeps_finished_work_and_rerun_resumes(prefect_server: None, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "adaptflow.cli", "run", str(DEMO), *ARGS, "--tracking-uri", uri]
    # the session's Prefect server (starting a temporary one of its own would add a server start-up),
    # and the same result storage (PREFECT_HOME) as this test session
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        run = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=stderr)  # fmt: skip
    client = MlflowClient(tracking_uri=uri)
    deadline = time.time() + 300
    try:
        while not evaluation_runs(client, "FINISHED"):  # one evaluation logged whole, while others run
            assert run.poll() is None, "the study ended before it could be interrupted"
            assert time.time() < deadline, "no evaluation was logged in time"
            time.sleep(0.1)
    finally:
        stop(run, grace=60)
    finished = {r.info.run_name for r in evaluation_runs(client, "FINISHED")}
    assert 1 <= len(finished) < EVALUATIONS  # kept what it finished, and did not finish everything
    experiment_id = client.get_experiment_by_name("interrupted").experiment_id
    (interrupted,) = client.search_runs([experiment_id], "tags.kind = 'study'")
    assert interrupted.info.status == "KILLED", log.read_text()

    assert main(["run", str(DEMO), *ARGS, "--tracking-uri", uri]) == 0
    latest = [
        r for r in client.search_runs([experiment_id], "tags.kind = 'study'") if r.info.status == "FINISHED"
    ]
    assert len(latest) == 1
    resumed = {
        r.info.run_name: r.data.tags["reused_cached_results"]
        for r in evaluation_runs(client)
        if r.data.tags["mlflow.parentRunId"] == latest[0].info.run_id
    }
    assert len(resumed) == EVALUATIONS
    assert all(resumed[name] == "true" for name in finished)  # finished work was not redone


# Ctrl-C in a terminal: SIGINT to the foreground process group, whose members start with SIGINT's
# default action. A child of a non-interactive shell's background job inherits SIGINT ignored, so the
# command is started through an exec that restores the default, as a terminal's shell does.
WITH_DEFAULT_SIGINT = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]


@pytest.mark.parametrize("signal_to", ["the process", "the process group", "the terminal closing"])
def test_an_interruption_stops_the_worker_processes_and_the_temporary_server(
    signal_to: str, tmp_path: Path
) -> None:
    """`kill PID` (SIGTERM, what a scheduler sends), Ctrl-C in a terminal (SIGINT to the whole
    foreground process group) or the terminal closing (SIGHUP) to a `--workers 2` study with its own
    temporary Prefect server: the study exits promptly, says it was interrupted, marks its MLflow run
    KILLED and leaves no worker process or server behind. Before, SIGTERM left the server running and
    the workers finished their tasks first, Ctrl-C stopped the server with the group, so the command
    spent minutes retrying it, and SIGHUP ended the command with the server still running."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run, log = _start_with_own_server([*WITH_DEFAULT_SIGINT, *_run_command(uri), "--workers", "2"], tmp_path)
    client = MlflowClient(tracking_uri=uri)
    deadline = time.time() + 300
    try:
        while not evaluation_runs(client, "FINISHED"):  # the workers and the server are up and busy
            assert run.poll() is None, "the study ended before it could be interrupted"
            assert time.time() < deadline, "no evaluation was logged in time"
            time.sleep(0.1)
        if signal_to == "the process":
            os.kill(run.pid, signal.SIGTERM)
        elif signal_to == "the process group":
            os.killpg(run.pid, signal.SIGINT)
        else:  # SIGHUP's default action would end the study without stopping the server it started
            os.kill(run.pid, signal.SIGHUP)
        sent = time.time()
        run.wait(timeout=300)
        took = time.time() - sent
    finally:
        stop(run, grace=10)
    printed = log.read_text()
    assert run.returncode == 130 and "adaptflow: interrupted" in printed, printed
    assert took < 30, f"the study took {took:.0f} s to stop:\n{printed}"
    assert "Connection refused" not in printed  # the server answered the flow's last requests
    left = time.time() + 15  # the group's last members may take a moment to be reaped
    while _group_alive(run.pid):
        assert time.time() < left, "a worker process outlived the study"
        time.sleep(0.2)
    port = int(re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", printed).group(1))
    assert not _port_open(port)  # the server, in a process group of its own, was stopped too
    experiment_id = client.get_experiment_by_name("interrupted").experiment_id
    (interrupted,) = client.search_runs([experiment_id], "tags.kind = 'study'")
    assert interrupted.info.status == "KILLED", printed


# An `adaptflow` command whose `main` returns the interrupted status with a thread that never ends,
# which Python's exit would wait for forever.
BLOCKED_EXIT = """
import threading
import adaptflow.cli as cli

def blocked_forever():
    threading.Event().wait()

def interrupted():
    threading.Thread(target=blocked_forever).start()
    return cli.INTERRUPTED

cli.EXIT_GRACE_SECONDS = 1.0
cli.main = interrupted
cli.command()
"""


def test_an_interrupted_command_leaves_even_when_a_thread_blocks_its_exit() -> None:
    """An interrupted `--workers 2` study once printed "interrupted" and then never exited (cause not
    found). The command now leaves EXIT_GRACE_SECONDS after main returns, with the interrupted status,
    and prints the stack of the thread that held it."""
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_EXIT], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 130, done.stderr
    assert "still not exited 1 s after the interruption; leaving now" in done.stderr
    assert "in blocked_forever" in done.stderr  # the stack of the thread that blocked the exit


# The same, with an atexit handler that holds the interpreter's lock forever, so no Python thread runs.
LOCKED_EXIT = """
import atexit
import ctypes
import adaptflow.cli as cli

def held_forever():
    ctypes.PyDLL(None).pause()  # a C call that keeps the interpreter's lock

cli.EXIT_GRACE_SECONDS = 1.0
cli.main = lambda: cli.INTERRUPTED
atexit.register(held_forever)
cli.command()
"""


def test_an_interrupted_command_leaves_even_when_its_exit_holds_the_interpreters_lock() -> None:
    """The grace timer is Python code, which cannot run while a C call holds the interpreter's lock:
    faulthandler's watchdog, in C, ends the process 5 s after it (status 1), with the stacks."""
    if not sys.platform.startswith("linux"):
        pytest.skip("calls libc's pause()")
    done = subprocess.run(
        [sys.executable, "-c", LOCKED_EXIT], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 1, done.stderr
    assert "in held_forever" in done.stderr


def test_sigterm_stops_a_training_running_in_the_study_process(prefect_server: None, tmp_path: Path) -> None:
    """With `--workers 1` a training is a thread of the study process, which cannot be killed: on
    SIGTERM it checkpoints at the end of its current step and stops, so the study exits at once instead
    of after a training that has 100,000 steps to go."""
    from prefect.settings import PREFECT_API_URL

    storage = tmp_path / "results"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = cli_overrides(
        "name=stopped", "train.steps=100000", "train.val_every=100", "train.meta_batch=2",
        "train.val_episodes=5", "train.checkpoint_seconds=0", "seeds=[0]", "target=[webcam]",
        "algorithms=[{name: protonet}]",
    )  # fmt: skip
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(storage),
    }
    command = [
        sys.executable,
        "-m",
        "adaptflow.cli",
        "run",
        str(DEMO),
        *args,
        "--workers",
        "1",
        "--tracking-uri",
        uri,
    ]
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        run = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=stderr)  # fmt: skip
    deadline = time.time() + 300
    try:
        while not any(step >= 100 for step in checkpoint_steps(storage)):
            assert run.poll() is None, "the study ended before it could be interrupted"
            assert time.time() < deadline, "no checkpoint was written in time"
            time.sleep(0.05)
        os.kill(run.pid, signal.SIGTERM)
        sent = time.time()
        run.wait(timeout=120)
        took = time.time() - sent
    finally:
        stop(run, grace=10)
    printed = log.read_text()
    assert run.returncode == 130 and "adaptflow: interrupted" in printed
    assert took < 30, f"the study took {took:.0f} s to stop: the running training was waited for"
    (stopped_at,) = checkpoint_steps(storage)  # the rerun resumes from here (tests/test_resume.py)
    assert 100 <= stopped_at < 100000
    # the training ends Cancelled, saying where it stopped, not Failed with a traceback
    assert f"Finished in state Cancelled('ProtoNet stopped at step {stopped_at} of 100000" in printed
    assert "Traceback" not in printed and "Stopped(" not in printed
    assert "NotReady" not in printed  # the evaluations that waited on it say nothing in the terminal


def test_a_sigkilled_study_leaves_no_temporary_server(tmp_path: Path) -> None:
    """SIGKILL gives the study no chance to clean up, and its temporary Prefect server is in a process
    group of its own (so that Ctrl-C does not stop it under the flow): the server must still stop,
    by the death signal Linux sends it when the study dies. Before, it ran on after the study."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    run, log = _start_with_own_server(_run_command(f"sqlite:///{tmp_path / 'mlflow.db'}"), tmp_path)
    deadline = time.time() + 300
    try:
        while "Beginning flow run" not in log.read_text():  # the server is up and serving the flow
            assert run.poll() is None, f"the study ended before it could be killed: {log.read_text()}"
            assert time.time() < deadline, "the flow did not start in time"
            time.sleep(0.1)
        run.kill()
        run.wait(10)
    finally:
        stop(run, grace=1)
    port = int(re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", log.read_text()).group(1))
    left = time.time() + 30  # the server's shutdown takes a moment
    while _port_open(port):
        assert time.time() < left, f"the temporary server on port {port} outlived the SIGKILLed study"
        time.sleep(0.2)


def test_a_study_that_fails_its_checks_stops_the_server_it_launched(tmp_path: Path) -> None:
    """`adaptflow run` starts its temporary server before the study's imports and data checks, so that
    it boots meanwhile (flows/server.py); a check that fails must stop it at once, without the
    server's start and stop lines around the error, and leave no server process behind."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads the processes' environments from /proc")
    too_many_shots = [*_run_command(f"sqlite:///{tmp_path / 'mlflow.db'}"), "--set", "episodes.shots=[50]"]
    run, log = _start_with_own_server(too_many_shots, tmp_path)
    assert run.wait(120) == 2, log.read_text()
    printed = log.read_text()
    assert "adaptflow: error: the data cannot supply the episodes asked for" in printed
    assert "temporary server" not in printed
    home = f"PREFECT_HOME={tmp_path / 'prefect'}".encode()
    servers = []
    for process in Path("/proc").glob("[0-9]*"):
        try:
            if b"create_app" in (process / "cmdline").read_bytes():
                servers += [process.name] if home in (process / "environ").read_bytes().split(b"\0") else []
        except OSError:  # it ended meanwhile, or is not ours to read
            continue
    assert not servers, f"the temporary server (pid {servers}) outlived the failed study"


def test_a_tracking_uri_in_a_prefect_secret_is_read_from_a_server_that_answers(tmp_path: Path) -> None:
    """A `prefect-secret:` tracking URI is read from Prefect during the checks; a temporary server
    launched in the background (above) would not answer yet (a ConnectError traceback, seen in review),
    so then none is launched early and the check gets Prefect's own answer: here, no such block."""
    run, log = _start_with_own_server(_run_command("prefect-secret:missing"), tmp_path)
    assert run.wait(120) == 2, log.read_text()
    printed = log.read_text()
    assert (
        "adaptflow: error: tracking URI 'prefect-secret:missing': Prefect has no Secret block named"
        in printed
    )
    assert "Traceback" not in printed


SERVED_STUDY = """
import sys
import psutil
from adaptflow.cli import main
from flows import server
from prefect import get_client
from prefect.settings import PREFECT_API_URL, get_current_settings
code = main(sys.argv[1:])  # a whole study in worker processes, with the server its command launched
launched, url = server._launched.process.pid, server._launched.api_url
server_module = "prefect.server.api.server" in sys.modules
def command_line(process):
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # ended meanwhile
        return ""
with server.launched_for(True), server.shared_prefect_server():  # a second study of the same process
    children = psutil.Process().children(recursive=True)
    servers = [child.pid for child in children if "create_app" in command_line(child)]
    with get_client(sync_client=True) as client:
        healthy = client.api_healthcheck() is None
    same_url = PREFECT_API_URL.value() == url
    no_heartbeats = get_current_settings().flows.heartbeat_frequency is None
print(code, server_module, servers == [launched], healthy, same_url, no_heartbeats, launched)
"""


def test_a_study_talks_to_its_temporary_server_without_loading_prefects_server_code(tmp_path: Path) -> None:
    """`adaptflow run` launches the temporary server without importing Prefect's server module (1.2-1.9
    s, flows/server.py), and does not hand it to that module's record of servers either: every Prefect
    client of a study must find the server's URL in its settings, or it would import the module to
    start a server of its own. One did: the thread of Prefect's process pool that forwards its workers'
    logs and events, hence the study in worker processes. After it the module is still unloaded; a
    second study in the same process uses the same server rather than launching another, and its flow
    runs send no heartbeats to it; and the server stops when the process exits."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads the server's command line from /proc")
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    study = cli_overrides(
        *TINY_TRAINING, "episodes.eval_episodes=20", "seeds=[0]", "algorithms=[{name: protonet}]"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        sys.executable,
        "-c",
        SERVED_STUDY,
        "run",
        str(DEMO),
        *study,
        "--tracking-uri",
        uri,
        "--workers",
        "2",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    *checks, pid = done.stdout.splitlines()[-1].split()
    assert checks == ["0", "False", "True", "True", "True", "True"], done.stderr
    left = time.time() + 30
    while _is_server(pid):
        assert time.time() < left, f"the temporary server (pid {pid}) outlived its process"
        time.sleep(0.2)


def _is_server(pid: str) -> bool:
    """Whether process `pid` runs a Prefect server (`create_app`), not some later process that got its pid."""
    try:
        return b"create_app" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it has ended
        return False


def _run_command(uri: str) -> list[str]:
    return [sys.executable, "-m", "adaptflow.cli", "run", str(DEMO), *ARGS, "--tracking-uri", uri]


def _start_with_own_server(command: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """The command started in a session of its own, with a temporary Prefect server of its own (not the
    test session's); its stderr goes to the returned log file."""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        run = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=stderr)  # fmt: skip
    return run, log


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
