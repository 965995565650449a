"""The `sweep` flow: algorithms x domain pairs x shots x seeds, fanned out as concurrent task runs.

Each domain pair is one study (its own MLflow parent run), built from the study flow's pieces.
Every train and evaluate task of every pair is submitted before any is awaited, so they run
side by side, at most `PREFECT_TASKS_RUNNER_PROCESS_POOL_MAX_WORKERS` at a time (default: the
number of CPUs), each with its share of the cores as torch threads. Tasks run in processes, not
threads, because torch's random generator is global to a process. Tasks cache on their inputs,
so rerunning an interrupted sweep trains only what had not finished. For more than one machine,
run it with prefect-dask's DaskTaskRunner (docs/orchestration.md).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from adaptflow.errors import StudyError
from adaptflow.spec import load_spec
from flows.study import (
    end,
    failed,
    log_study,
    plan_study,
    processes,
    searched,
    start_study,
    submit_evaluation,
    submit_training,
    terminating,
)
from tasks.artifacts import study_run_name
from tasks.report import report_study
from tasks.tracking import tracking_store


class DomainPair(BaseModel):
    """Source domains to meta-train on and target domains to adapt to."""

    model_config = ConfigDict(extra="forbid")
    source: list[str] = Field(min_length=1)
    target: list[str] = Field(min_length=1)


def leave_one_domain_out(domains: list[str]) -> list[DomainPair]:
    """Each domain as the target once, all the others as the source."""
    return [DomainPair(source=[d for d in domains if d != target], target=[target]) for target in domains]


@flow(name="sweep", flow_run_name=study_run_name, log_prints=True, task_runner=processes())
def sweep(
    spec: str | dict[str, Any] = "studies/demo.yaml",
    overrides: list[str] | None = None,
    pairs: list[DomainPair] | None = None,
    leave_one_out: list[str] | None = None,
    tracking_uri: str | None = None,
) -> list[dict[str, Any]]:
    """Runs the spec's algorithms, shots and seeds on every domain pair: `pairs`, plus each of
    `leave_one_out` as target against the rest; the spec's own pair if neither is given.
    Returns the summary rows of all pairs."""
    tracking_uri = tracking_store(tracking_uri)  # a server that is down fails the sweep here
    overrides = overrides or []
    cells = [*(pairs or []), *leave_one_domain_out(leave_one_out or [])]
    if not cells:
        base = load_spec(spec, overrides)
        cells = [DomainPair(source=base.source, target=base.target)]
    plans = [
        plan_study(
            load_spec(spec, [*overrides, f"source={json.dumps(c.source)}", f"target={json.dumps(c.target)}"])
        )
        for c in cells
    ]  # every pair is validated before anything is logged or trained
    flow_run_id = str(flow_run.id)
    tags = {"prefect_flow_run_id": flow_run_id, "prefect_flow": "sweep"}
    with ExitStack() as ending:  # each run ends when its pair is done; if the sweep stops, those left too
        runs = []
        for plan in plans:  # each run is in the stack as soon as it exists
            runs.append(start_study(plan, tracking_uri, tags))
            ending.enter_context(terminating(runs[-1]))
        plans = [searched(plan, run) for plan, run in zip(plans, runs, strict=True)]  # if the spec searches
        trainings = [submit_training(plan) for plan in plans]  # all of them before any evaluation
        pending = [submit_evaluation(plan, models) for plan, models in zip(plans, trainings, strict=True)]
        rows: list[dict[str, Any]] = []
        errors = []
        for plan, run, items in zip(plans, runs, pending, strict=True):
            logged = log_study(plan, run, items, flow_run_id)
            if logged.results:
                summary = report_study(run, plan.spec, logged.results)
                rows += summary.assign(source=",".join(plan.spec.source)).to_dict(orient="records")
            if logged.failures:
                errors.append(failed(plan.spec, logged))
            end(run, "FAILED" if logged.failures else "FINISHED")
        if errors:
            raise StudyError("\n".join(str(error) for error in errors))
    return rows
