"""Prefect artifacts that point from the Prefect UI to the results: MLflow links, training progress."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from prefect.artifacts import create_link_artifact, create_progress_artifact, update_progress_artifact

from adaptflow.redact import redact
from adaptflow.spec import StudySpec

if TYPE_CHECKING:  # not at run time: train-task processes need not import MLflow
    from tasks.tracking import StudyRun


def mlflow_ui_url(tracking_uri: str) -> str:
    """Where users open MLflow: the tracking server itself, else ADAPTFLOW_MLFLOW_UI_URL (`mlflow ui`)."""
    if urlsplit(tracking_uri).scheme in ("http", "https"):
        return tracking_uri.rstrip("/")
    return os.environ.get("ADAPTFLOW_MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def link_mlflow_run(run: StudyRun, spec: StudySpec) -> None:
    """A link artifact on the flow run to the study's MLflow parent run."""
    url = f"{mlflow_ui_url(run.tracking_uri)}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
    create_link_artifact(
        link=redact(url),
        link_text=f"MLflow parent run of {spec.name}",
        key=artifact_key("mlflow", spec.name, *spec.target),
        description=f"{spec.name}: source {', '.join(spec.source)} -> target {', '.join(spec.target)} "
        f"(tracking URI {redact(run.tracking_uri)})",
    )


class TrainingProgress:
    """A progress artifact on the train task run, moved on at each source-validation step."""

    def __init__(self, steps: int, description: str) -> None:
        self.steps = max(steps, 1)
        self.artifact_id = create_progress_artifact(progress=0.0, description=description)

    def update(self, step: int) -> None:
        update_progress_artifact(self.artifact_id, progress=100.0 * min(step, self.steps) / self.steps)
