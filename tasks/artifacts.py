"""Prefect artifacts that point from the Prefect UI to the results: links to MLflow runs."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from prefect.artifacts import create_link_artifact
from prefect.runtime import flow_run

from adaptflow import settings
from adaptflow.errors import StudyError
from adaptflow.redact import redact
from adaptflow.spec import StudySpec, load_spec

if TYPE_CHECKING:  # not at run time: train-task processes need not import MLflow
    from tasks.tracking import StudyRun


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def study_run_name() -> str:
    """A flow run's name from its spec, `<name>·<targets>` (a sweep's `<name>·sweep`), so the Prefect
    UI lists studies by what they are, not by random words. A spec that does not load leaves the
    error to the flow, which reports it in full."""
    parameters = flow_run.parameters
    try:
        spec = load_spec(parameters["spec"], parameters.get("overrides") or [])
    except StudyError:
        return f"{flow_run.flow_name}·invalid spec"
    return f"{spec.name}·sweep" if flow_run.flow_name == "sweep" else f"{spec.name}·{'+'.join(spec.target)}"


def link_mlflow_run(run: StudyRun, spec: StudySpec) -> None:
    """A link artifact on the flow run to the study's MLflow parent run."""
    url = settings.mlflow_page(settings.mlflow_ui_url(run.tracking_uri), run.experiment_id, run.run_id)
    create_link_artifact(
        link=redact(url),
        link_text=f"MLflow parent run of {spec.name}",
        key=artifact_key("mlflow", spec.name, *spec.target),
        description=f"{spec.name}: source {', '.join(spec.source)} -> target {', '.join(spec.target)} "
        f"(tracking URI {redact(run.tracking_uri)})",
    )
