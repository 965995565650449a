"""Parent runs that tell the truth after their process died.

A study killed with SIGKILL (or a machine that lost power) cannot end its MLflow runs. Each study run
is tagged with the process that owns it (`adaptflow.process` = host:pid); when a study starts, the
RUNNING runs of its experiment owned by a process of this host that no longer exists are ended
KILLED, with their RUNNING child runs. Runs owned by other hosts are left to those hosts.
"""

from __future__ import annotations

import os
import socket

from mlflow.tracking import MlflowClient

OWNER_TAG = "adaptflow.process"


def owner() -> str:
    """This process, as the owner tag names it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def dead_here(process: str) -> bool:
    host, _, pid = process.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def end_stale_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Ends KILLED the RUNNING runs of the experiment whose owning process on this host is gone, and
    their RUNNING children; returns the ids of the runs ended."""
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=50000)
    stale = [run.info.run_id for run in running if dead_here(run.data.tags.get(OWNER_TAG, ""))]
    children = [run.info.run_id for run in running if run.data.tags.get("mlflow.parentRunId") in stale]
    for run_id in [*children, *stale]:
        client.set_terminated(run_id, "KILLED")
    return [*stale, *children]
