"""Defaults for the embedded setup, applied before Prefect or MLflow are imported.

Project-local state (Prefect home, MLflow sqlite store), no telemetry, and a Prefect
start-up timeout long enough for a cold temporary server on a small machine. Every
value is a default: a variable already set in the environment wins.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

PROJECT_DIR = Path(os.environ.get("ADAPTFLOW_HOME", Path.cwd())).resolve()

DEFAULTS = {
    "PREFECT_HOME": str(PROJECT_DIR / ".prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # compare downloads one small file per run
}


def apply_defaults() -> None:
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)


SECRET_PREFIX = "prefect-secret:"  # a tracking URI read from the Prefect Secret block named after it


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else an sqlite store in the project folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_DIR / 'mlflow.db'}"


def pool_pickup_timeout() -> float:
    """Seconds a training sent to a work pool may wait for a worker to pick it up
    (ADAPTFLOW_POOL_PICKUP_TIMEOUT, default 300): then no worker is up, and waiting would hang."""
    return float(os.environ.get("ADAPTFLOW_POOL_PICKUP_TIMEOUT", "300"))


def mlflow_ui_url(tracking_uri: str) -> str:
    """Where users open MLflow: a tracking server itself; for a local store, ADAPTFLOW_MLFLOW_UI_URL,
    else the address `adaptflow ui` serves it on when that port is free. Prefect artifacts link there."""
    if urlsplit(tracking_uri).scheme in ("http", "https"):
        return tracking_uri.rstrip("/")
    return os.environ.get("ADAPTFLOW_MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")


def mlflow_page(ui_url: str, experiment_id: str, run_id: str | None = None, tab: str = "runs") -> str:
    """The MLflow UI page of an experiment's runs table (or `tab="models"`: its logged models), or of
    one run, in machine-learning mode: MLflow 3.17 opens experiments in its GenAI view unless the URL
    asks for `workflowType`."""
    run = f"/{run_id}" if run_id else ""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/{tab}{run}?workflowType=machine_learning"


apply_defaults()


NOT_READY = "Finished in state NotReady("  # Prefect's line for a task whose upstream failed


class QuietTaskRuns(logging.Filter):
    """Drops task runs' INFO lines ("Finished in state Completed()", per-validation notes) from the
    terminal, and the errors of tasks that never started because a task they wait on did not complete
    ("Finished in state NotReady(...)", one per waiting evaluation after a failed or stopped training,
    which is reported itself); other warnings and errors stay, and the Prefect UI receives every line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect.task_runs"):
            return True
        return record.levelno >= logging.WARNING and not record.getMessage().startswith(NOT_READY)


# Set by `quiet_task_logs`, so the task-runner processes it starts quieten their consoles too.
QUIET_TASK_LOGS = "ADAPTFLOW_QUIET_TASK_LOGS"


def quiet_task_logs() -> None:
    """Applies QuietTaskRuns to this process's console handlers (Prefect's console is the root's),
    and asks the worker processes this process starts to do the same (`quiet_if_asked`)."""
    os.environ[QUIET_TASK_LOGS] = "1"
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, QuietTaskRuns) for f in handler.filters):
            handler.addFilter(QuietTaskRuns())


def quiet_if_asked() -> None:
    """In a task-runner worker process: quietens its console when the process that started it did."""
    if os.environ.get(QUIET_TASK_LOGS):
        quiet_task_logs()
