"""Prefect's temporary server for `adaptflow run`: launched before the study's heavy imports, shared.

Without PREFECT_API_URL, every process that talks to Prefect starts its own temporary server (a cold
start each, several seconds), task-runner workers included. `adaptflow run` launches the one its flow
would start as soon as the spec has passed the checks that need neither PyTorch nor `datasets`, so
that the server boots on another core while PyTorch and the study's modules import and the spec and
data are checked (`launched_for`), and waits for it only when the flow starts (docs/benchmarks.md
measures the gain). Until then, this module imports no more of Prefect
than its settings: not Prefect's server, which this process does not run.

The server runs in a process group of its own: Ctrl-C in a terminal signals the whole foreground
group, and a server stopped with the study would leave the interrupted flow retrying it for minutes to
record how it ended. It is stopped when this process exits (Prefect's own `stop`, at exit), and, on
Linux, also when this process is killed. One exception: with a tracking URI in a Prefect Secret, the
checks read the Secret through Prefect, which starts the server itself, in the study's process group
and without the death signal.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import prefect
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

if TYPE_CHECKING:
    from prefect.server.api.server import SubprocessASGIServer

ADDRESS_IN_USE = 3  # uvicorn's exit status when its port was taken meanwhile
LOOPBACK = "127.0.0.1"
PORTS = range(8000, 9000)  # where Prefect's temporary servers listen


@contextmanager
def launched_for(launch: bool) -> Iterator[None]:
    """Prefect's temporary server started in the background while the block (a study's imports and
    checks) runs, without waiting for it to answer (`shared_prefect_server` waits); if the block
    fails, the server is stopped at once, without a word. Nothing is started unless `launch` (false
    when the block itself talks to Prefect, which would find a server not yet answering), nor when
    an API URL is set or ephemeral servers are off.

    Use it in the main thread: the server stops when the thread that started it ends
    (`_stopped_with_parent`)."""
    if not launch or not _ephemeral():
        yield
        return
    _launch()
    try:
        yield
    except BaseException:
        _stop_launched()
        raise


@contextmanager
def shared_prefect_server(running: str | None = None) -> Iterator[None]:
    """Prefect's temporary server, up and answering, with its URL in the settings the flow and its
    task-runner workers inherit (launched here unless `launched_for` launched it). Given the
    API URL of a `running` server (`adaptflow ui`'s), it uses that one instead and starts none."""
    if running is not None:
        with temporary_settings(updates={PREFECT_API_URL: running}):
            yield
        return
    if not _ephemeral():
        yield
        return
    server = _prefect_server()
    from prefect.server.api.server import subprocess_server_logger

    subprocess_server_logger.info(f"Starting temporary server on {server.address}")
    _wait_until_up(server, get_current_settings().server.ephemeral.startup_timeout_seconds)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def _ephemeral() -> bool:
    """Whether this process's Prefect clients would start a temporary server of their own."""
    return not get_current_settings().api.url and get_current_settings().server.ephemeral.enabled


@dataclass
class _Launched:
    """The temporary server this process launched: its port and process, until Prefect's own record
    of it takes them over (`_prefect_server`)."""

    port: int
    process: subprocess.Popen[bytes]


_launched: _Launched | None = None


def _launch() -> None:
    """Starts the temporary server unless this process launched one that Prefect does not hold yet.

    Prefect's `SubprocessASGIServer` is not used for the start: importing its module imports Prefect's
    whole server (1.6-1.8 s here), which this process never runs; launched without it, the server
    boots that much sooner while the study imports. The command is the one that class runs
    (`_run_uvicorn_command`, Prefect 3.x)."""
    global _launched
    if _launched is None and not _held_by_prefect():
        _launched = _Launched(*_spawn())
        atexit.register(_stop_launched)  # unless Prefect's record takes it over (its stop, at exit)


def _spawn() -> tuple[int, subprocess.Popen[bytes]]:
    """Prefect's temporary server on a free loopback port: its `create_app`, no UI, marked ephemeral,
    with this process's Prefect settings. In a process group of its own (POSIX), so that Ctrl-C does
    not stop it under the interrupted flow, and stopped when this process dies (`_stopped_with_parent`)."""
    port = _free_port()
    command = [
        *(sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent)),
        *("--factory", "prefect.server.api.server:create_app", "--host", LOOPBACK, "--port", str(port)),
        *("--log-level", "error", "--lifespan", "on"),
    ]
    environment = {
        **os.environ,
        **{"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"},
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    if os.name != "posix":  # process groups and the death signal are POSIX's
        return port, subprocess.Popen(command, env=environment)
    death_signal = _stopped_with_parent()
    return port, subprocess.Popen(command, env=environment, process_group=0, preexec_fn=death_signal)


def _free_port() -> int:
    """A port of Prefect's range for temporary servers that nothing listens on now. Another process
    can take it before the server binds it; `_wait_until_up` then starts the server again."""
    for port in random.sample(PORTS, len(PORTS)):
        with socket.socket() as probe:
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port for Prefect's temporary server in {PORTS[0]}-{PORTS[-1]}")


def _held_by_prefect() -> bool:
    """Whether Prefect's record holds a running temporary server already (an earlier study of this
    process, or Prefect's own clients). Its module is loaded once one was, so this imports nothing."""
    module = sys.modules.get("prefect.server.api.server")
    return module is not None and module.SubprocessASGIServer().running


def _prefect_server() -> SubprocessASGIServer:
    """Prefect's record of its temporary server, holding the one to use: one Prefect's own clients
    started already (the checks read a Prefect Secret), else the one this process launched, launched
    now if it did not. Held there, a Prefect client that finds no API URL in its settings uses it
    rather than starting another, and Prefect stops it at exit."""
    from prefect.server.api.server import SubprocessASGIServer

    global _launched
    server = SubprocessASGIServer()
    if server.running:  # none was launched here, unless Prefect's clients started one meanwhile
        _stop_launched()
        return server
    _launch()
    assert _launched is not None
    server.port, server.server_process, server.running = _launched.port, _launched.process, True
    _launched = None  # Prefect's record has it now
    atexit.register(server.stop)
    return server


def _stop_launched() -> None:
    """Kills the server this process launched, if Prefect's record does not hold it yet."""
    global _launched
    if _launched is not None:
        _launched.process.kill()
        _launched.process.wait()
        _launched = None


def _wait_until_up(server: SubprocessASGIServer, timeout: float) -> None:
    """Until the server answers its health check, as Prefect's `SubprocessASGIServer.start` waits;
    a server that lost its port to another process meanwhile is started again on another."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while True:
            assert server.server_process is not None
            status = server.server_process.poll()
            if status == ADDRESS_IN_USE:
                server.port, server.server_process = _spawn()
            elif status is not None:
                raise RuntimeError(f"Prefect's temporary server exited with status {status} as it started")
            try:
                if client.get(f"{server.api_url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Prefect's temporary server did not answer within {timeout:.0f} s; raise "
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a slow machine"
                )
            time.sleep(0.1)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _stopped_with_parent() -> Callable[[], None] | None:
    """On Linux, a child started with this as `preexec_fn` gets SIGTERM when the thread that started it
    ends, so a server started in the main thread stops even when the study is SIGKILLed (nothing in
    the study can clean up then). The library call is looked up here, in the parent: the child, forked
    from a process with threads, only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the call: nothing would signal
            os.kill(os.getpid(), signal.SIGTERM)

    return set_death_signal
