"""Prefect's temporary server for `adaptflow run`: launched before the study's heavy imports, shared.

Without PREFECT_API_URL, every process that talks to Prefect starts its own temporary server (a cold
start each, several seconds), task-runner workers included. `adaptflow run` launches the one its flow
would start as soon as the spec has passed the checks that need neither PyTorch nor `datasets`, so
that the server boots on another core while PyTorch and the study's modules import and the spec and
data are checked (`launched_for`), and waits for it only when the flow starts (docs/benchmarks.md
measures the gain). This process does not import Prefect's server, unless Prefect's own clients
start it (a tracking URI in a Prefect Secret, below): it only talks to it.

The server runs in a process group of its own: Ctrl-C in a terminal signals the whole foreground
group, and a server stopped with the study would leave the interrupted flow retrying it for minutes to
record how it ended. It is stopped when this process exits (asked to stop, and killed after 5 s, as
Prefect stops its own), and, on Linux, also when this process is killed. One exception: with a
tracking URI in a Prefect Secret, the checks read the Secret through Prefect, which starts the server
itself, in the study's process group and without the death signal.
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
from prefect.context import refresh_global_settings_context
from prefect.logging import get_logger
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
    API URL of a `running` server (`adaptflow ui`'s), it uses that one instead and starts none.

    On the temporary server, flow runs send no heartbeats: a flow's heartbeat thread, which sleeps in
    steps of a second, held up the end of every study by up to a second. Prefect acts on missing
    heartbeats only through a zombie-flow automation a user creates, on a server that outlives the
    flow; the temporary server stops with it. (With such an automation in the project's Prefect
    database, a killed study's flow run on the temporary server stays Running.)"""
    if running is not None:
        _share(running)
        with temporary_settings(updates={PREFECT_API_URL: running}):
            yield
        return
    if _launched is None and not _ephemeral():  # a server of the user's, or none at all
        yield
        return
    held = _held_by_prefect()
    if held is not None:  # Prefect's clients started one (the checks read a Prefect Secret): use it
        _stop_launched()
        url = held.api_url
    else:
        _launch()
        assert _launched is not None
        get_logger().info(f"Starting temporary server on {_launched.address}")
        _wait_until_up(_launched, get_current_settings().server.ephemeral.startup_timeout_seconds)
        url = _launched.api_url
    _share(url)
    with temporary_settings(updates={PREFECT_API_URL: url, "flows.heartbeat_frequency": None}):
        yield


def _share(url: str) -> None:
    """The server's URL for every Prefect client of this process and of the processes it starts, for
    the rest of its life (a later study of the same process uses the same server). `temporary_settings`
    reaches only the calling thread and what it hands its context to; a thread started without it,
    such as the thread of Prefect's process pool that forwards its workers' logs and events, reads
    Prefect's process-wide settings, and without a URL there would start a temporary server of its
    own."""
    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()  # Prefect's process-wide settings, read again from the environment


def _ephemeral() -> bool:
    """Whether this process's Prefect clients would start a temporary server of their own."""
    return not get_current_settings().api.url and get_current_settings().server.ephemeral.enabled


@dataclass
class _Launched:
    """The temporary server this process launched, for the rest of the process's life."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.address}/api"


_launched: _Launched | None = None


def _launch() -> None:
    """Starts the temporary server unless this process launched one already.

    Prefect's `SubprocessASGIServer` is not used: importing its module imports Prefect's whole server
    (1.2-1.9 s here), which this process never runs. The command is the one that class runs
    (`_run_uvicorn_command`, Prefect 3.x). Nor is the server handed to that class's record of its
    servers: a Prefect client of this process finds no server there, only the URL in its settings,
    and one without it would start a server of its own; `_share` gives every client the URL
    (test_interruption.py checks that the module stays unloaded through a whole study)."""
    global _launched
    if _launched is None:
        _launched = _Launched(*_spawn())
        atexit.register(_stop_launched, grace=5)


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


def _held_by_prefect() -> SubprocessASGIServer | None:
    """Prefect's record of a running temporary server, if its clients started one (a Prefect Secret
    read during the checks). Its module is loaded once one was, so this imports nothing."""
    module = sys.modules.get("prefect.server.api.server")
    server = None if module is None else module.SubprocessASGIServer()
    return server if server is not None and server.running else None


def _stop_launched(grace: float = 0) -> None:
    """Stops the server this process launched: asked to stop and given `grace` seconds (at exit, as
    Prefect stops its own), else killed (unused: the study failed its checks, or Prefect's clients
    started a server of their own)."""
    global _launched
    if _launched is None:
        return
    process, _launched = _launched.process, None
    if grace:
        process.terminate()
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
    process.kill()
    process.wait()


def _wait_until_up(server: _Launched, timeout: float) -> None:
    """Until the server answers its health check, as Prefect's `SubprocessASGIServer.start` waits;
    a server that lost its port to another process meanwhile is started again on another."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while True:
            status = server.process.poll()
            if status == ADDRESS_IN_USE:
                server.port, server.process = _spawn()
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
