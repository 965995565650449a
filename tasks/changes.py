"""What changed since the previous run of the same spec: the regression alarm of scheduled runs.

Each study run is tagged with a digest of its spec and cells when it reports, and compared with the
latest earlier finished run of that digest: every cell whose accuracy moved by more than the two runs'
seed-aware intervals allow (|Δ| > sqrt(ci₁² + ci₂²)), and every algorithm whose mean training or
evaluation time moved by more than its seeds' spread allows (or by more than half, with one seed),
is listed in a Prefect markdown artifact (key `changes`) and announced as a Prefect event
(`adaptflow.study.changed`) that an automation can notify on (docs/orchestration.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import dataclass

import pandas as pd
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from adaptflow.spec import StudySpec
from metalib.statistics import seed_interval
from tasks.tracking import StudyRun

SPEC_TAG = "spec_digest"
CHANGED_EVENT = "adaptflow.study.changed"
ONE_SEED_SPEED_RATIO = 1.5  # with one seed there is no spread: a time moved if it changed by half


def spec_digest(spec: StudySpec, summary: pd.DataFrame) -> str:
    """Of everything the spec says and of the cells reported: two runs with one digest are meant to
    give the same numbers (an `adaptflow evaluate` of one model has other cells than its study)."""
    cells = sorted(map(str, summary[["algorithm", "target", "shots", "seeds"]].itertuples(index=False)))
    # without train.checkpoint_seconds, which changes no number: digests made before it existed hold
    spec_dump = spec.model_dump(mode="json", exclude={"train": {"checkpoint_seconds"}})
    text = json.dumps([spec_dump, cells], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Change:
    """One quantity that moved beyond its interval between two runs of a spec."""

    what: str  # "accuracy %", "training s" or "evaluation s"
    cell: str  # e.g. "protonet · webcam · 5-shot", or the algorithm for times
    before: float
    after: float
    allowed: float  # the largest |after - before| the intervals explain


def accuracy_changes(previous: pd.DataFrame, current: pd.DataFrame) -> list[Change]:
    """Cells (algorithm, target, shots) of both summaries whose accuracy moved beyond the intervals."""
    both = previous.merge(current, on=["algorithm", "target", "shots"], suffixes=("_before", "_after"))
    changes = []
    for row in both.itertuples():
        allowed = math.hypot(row.ci95_before, row.ci95_after)
        if abs(row.acc_after - row.acc_before) > allowed:
            cell = f"{row.algorithm} · {row.target} · {row.shots}-shot"
            changes.append(
                Change("accuracy %", cell, 100 * row.acc_before, 100 * row.acc_after, 100 * allowed)
            )
    return changes


def speed_changes(previous: pd.DataFrame, current: pd.DataFrame) -> list[Change]:
    """Algorithms whose mean training or evaluation time per run moved beyond the seeds' intervals."""
    changes = []
    for column, what in (("train_seconds", "training s"), ("eval_seconds", "evaluation s")):
        for algorithm in sorted(set(previous.algorithm) & set(current.algorithm)):
            before, after = (_per_seed(frame, algorithm, column) for frame in (previous, current))
            if min(len(before), len(after)) > 1:
                allowed = math.hypot(seed_interval(before).half_width, seed_interval(after).half_width)
            else:
                allowed = (ONE_SEED_SPEED_RATIO - 1) * min(_mean(before), _mean(after))
            if abs(_mean(after) - _mean(before)) > allowed:
                changes.append(Change(what, algorithm, _mean(before), _mean(after), allowed))
    return changes


def _per_seed(runs: pd.DataFrame, algorithm: str, column: str) -> list[list[float]]:
    mine = runs[runs.algorithm == algorithm]
    return [group[column].tolist() for _, group in mine.groupby("seed", sort=True)]


def _mean(per_seed: list[list[float]]) -> float:
    return sum(sum(values) / len(values) for values in per_seed) / len(per_seed)


def changes_markdown(spec: StudySpec, previous_run: str, changes: list[Change]) -> str:
    header = f"## Changes since run {previous_run} of spec {spec.name!r}\n\n"
    if not changes:
        return header + "Nothing moved beyond its interval.\n"
    lines = ["| what | where | before | after | explained by the intervals up to |", "|---|---|---|---|---|"]
    lines += [
        f"| {c.what} | {c.cell} | {c.before:.1f} | {c.after:.1f} | ± {c.allowed:.1f} |" for c in changes
    ]
    return header + f"{len(changes)} moved beyond their intervals:\n\n" + "\n".join(lines) + "\n"


def report_changes(
    study: StudyRun, spec: StudySpec, summary: pd.DataFrame, runs: pd.DataFrame
) -> list[Change]:
    """Compares this run with the latest earlier finished run of the same digest, posts what moved (a
    Prefect artifact, and an event if anything did) and tags this run with the digest. Nothing to
    compare (a first run, or one logged by an older adaptflow) is not an error."""
    client = study.client
    digest = spec_digest(spec, summary)
    client.set_tag(study.run_id, SPEC_TAG, digest)
    earlier = client.search_runs(
        [study.experiment_id],
        f"tags.kind = 'study' and tags.{SPEC_TAG} = '{digest}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not earlier:
        return []
    previous_run = earlier[0].info.run_id
    with tempfile.TemporaryDirectory() as folder:
        previous = pd.read_csv(client.download_artifacts(previous_run, "results.csv", folder))
        previous_runs = pd.read_csv(client.download_artifacts(previous_run, "runs.csv", folder))
    changes = accuracy_changes(previous, summary)
    if {"train_seconds", "eval_seconds"} <= set(previous_runs.columns):
        changes += speed_changes(previous_runs, runs)
    create_markdown_artifact(
        markdown=changes_markdown(spec, previous_run, changes),
        key="changes",
        description=f"what moved since the previous run of spec {spec.name}",
    )
    if changes:
        emit_event(
            event=CHANGED_EVENT,
            resource={
                "prefect.resource.id": f"adaptflow.study.{spec.name}",
                "prefect.resource.name": spec.name,
            },
            payload={
                "previous_run": previous_run,
                "run": study.run_id,
                "changes": [vars(c) for c in changes],
            },
        )
    return changes
