"""Defaults for the embedded setup, applied before Prefect or MLflow are imported.

Project-local state (Prefect home, MLflow sqlite store), no telemetry, and a Prefect
start-up timeout long enough for a cold temporary server on a small machine. Every
value is a default: a variable already set in the environment wins.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else an sqlite store in the project folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_DIR / 'mlflow.db'}"


apply_defaults()
