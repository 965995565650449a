"""The evaluate flow: a saved model adapted to and scored on a spec's targets, without training again.

The spec says which data, targets, shots and episodes: with the study's own spec, the model meets the
same episodes as in its study and scores the same accuracies; with new targets (or a new dataset of
the same input shape), it is evaluated there by the same protocol. Runs are logged as a study run with
one child per (target, shots), as `adaptflow run` logs them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from adaptflow.errors import StudyError
from adaptflow.spec import load_spec
from flows.study import StudyPlan, evaluate_and_report, plan_study, start_study, terminating
from tasks.models import SavedModel, load_trained, read_saved_model
from tasks.tracking import tracking_store


def check_fits(saved: SavedModel, plan: StudyPlan) -> None:
    """The data must have the model's input shape, and the episodes its number of ways."""
    setup, spec = saved.setup, plan.spec
    if setup.input_shape != plan.prepared.input_shape:
        raise StudyError(
            f"the model takes inputs of shape {setup.input_shape} ({setup.backbone} backbone), but the "
            f"spec's {plan.prepared.modality} data has shape {plan.prepared.input_shape}; evaluate it on "
            "data prepared like its study's (same modality and settings)"
        )
    if setup.ways != spec.episodes.ways:
        raise StudyError(
            f"the model was trained and selected on {setup.ways}-way episodes; set episodes.ways: "
            f"{setup.ways} (the spec asks for {spec.episodes.ways})"
        )


def evaluation_run_name() -> str:
    parameters = flow_run.parameters
    return f"evaluate·{parameters['model_uri']}"


# One worker thread, as the study flow's: each evaluation seeds torch's process-wide generator.
@flow(
    name="evaluate-model",
    flow_run_name=evaluation_run_name,
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=1),
)
def evaluate_saved_model(
    model_uri: str,
    spec: str | dict[str, Any],
    overrides: list[str] | None = None,
    tracking_uri: str | None = None,
) -> list[dict[str, Any]]:
    """Evaluates the model at `model_uri` (models:/<model id>, runs:/<model run id> or
    models:/<name>/<version>) on the targets and shots of `spec`; returns the summary table rows."""
    tracking_uri = tracking_store(tracking_uri)
    saved = read_saved_model(model_uri, tracking_uri)
    plan = plan_study(load_spec(spec, overrides or []))
    check_fits(saved, plan)
    plan = replace(plan, setups=[saved.setup], searches={})
    flow_run_id = str(flow_run.id)
    tags = {
        "prefect_flow_run_id": flow_run_id,
        "evaluated_model": model_uri,
        "model_run_id": saved.model.run_id,
    }
    run = start_study(plan, tracking_uri, tags)
    with terminating(run):
        trained = load_trained.submit(tracking_uri, saved.model)
        return evaluate_and_report(plan, run, {(0, saved.seed, saved.target): trained}, flow_run_id)
