"""Prefect's temporary server for `adaptflow run`: launched before the study's heavy imports, shared.

Without PREFECT_API_URL, every process that talks to Prefect starts its own temporary server (a cold
start each, several seconds), task-runner workers included. `adaptflow run` launches the one its flow
would start as soon as the spec has passed its checks, so that the server boots on another core while
the study's modules import and its data is checked (`launched_for`), and waits for it only when the
flow starts (docs/benchmarks.md measures the gain). Until then, this module imports no more of Prefect
than its settings.

The server runs in a process group of its own: Ctrl-C in a terminal signals the whole foreground
group, and a server stopped with the study would leave the interrupted flow retrying it for minutes to
record how it ended. It is stopped when this process exits (Prefect's own `stop`, at exit), and, on
Linux, also when this process is killed.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

if TYPE_CHECKING:
    from prefect.server.api.server import SubprocessASGIServer

ADDRESS_IN_USE = 3  # uvicorn's exit status when its port was taken meanwhile


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
    server = _launch()
    try:
        yield
    except BaseException:
        if server is not None and server.server_process is not None:
            server.server_process.kill()
            server.server_process.wait()
            server.server_process = None  # Prefect's stop, at exit, has nothing left to stop
            server.running = False
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
    _launch()
    from prefect.server.api.server import SubprocessASGIServer, subprocess_server_logger

    server = SubprocessASGIServer()
    subprocess_server_logger.info(f"Starting temporary server on {server.address}")
    _wait_until_up(server, get_current_settings().server.ephemeral.startup_timeout_seconds)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def _ephemeral() -> bool:
    """Whether this process's Prefect clients would start a temporary server of their own."""
    return not get_current_settings().api.url and get_current_settings().server.ephemeral.enabled


def _launch() -> SubprocessASGIServer | None:
    """The server Prefect's own clients look up, started unless it runs; None if it ran already."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running:
        return None
    _spawn(server)
    server.running = True
    atexit.register(server.stop)
    return server


def _spawn(server: SubprocessASGIServer) -> None:
    """Prefect's own command for its temporary server, on a free port, in a process group of its own
    (`_new_processes_in_own_group`)."""
    server.port = server.find_available_port()
    with _new_processes_in_own_group():
        server.server_process = server._run_uvicorn_command()


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
                _spawn(server)
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


class _OwnGroupPopen(subprocess.Popen):  # type: ignore[type-arg]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, process_group=0, preexec_fn=_stopped_with_parent(), **kwargs)


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


@contextmanager
def _new_processes_in_own_group() -> Iterator[None]:
    """Processes started meanwhile get a process group of their own, and stop with this process even
    when it is killed (`_stopped_with_parent`). Prefect's temporary server is started by a private
    method of its class with no option for this, so `subprocess.Popen` is swapped for the moment of its
    start, in the main thread."""
    if os.name != "posix":  # process groups are POSIX's
        yield
        return
    popen = subprocess.Popen
    subprocess.Popen = _OwnGroupPopen  # type: ignore[misc]
    try:
        yield
    finally:
        subprocess.Popen = popen  # type: ignore[misc]
