"""The `compare` flow: the comparison table and plots for an experiment, on demand or on a schedule."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from tasks.compare import compare, render, write_outputs
from tasks.tracking import resolve_tracking_uri


@task(name="compare", tags=["cpu"])
def compare_experiment(
    experiment: str, tracking_uri: str, baseline: str, by: list[str] | None, study: str, out_dir: str
) -> str:
    client = MlflowClient(tracking_uri=tracking_uri)
    comparison = compare(client, experiment, baseline, by, study)
    write_outputs(client, experiment, comparison, "markdown", Path(out_dir))
    markdown = render(comparison, "markdown")
    create_markdown_artifact(markdown=f"## {experiment}\n\n{markdown}\n", key="comparison")
    return markdown


@flow(name="compare", log_prints=True)
def compare_flow(
    experiment: str,
    tracking_uri: str | None = None,
    baseline: str = "finetune",
    by: list[str] | None = None,
    study: str = "all",
    out_dir: str = "reports",
) -> str:
    """Reads an experiment's child runs from MLflow; writes and logs the table and plots.

    `study` is "all" (every study run of the experiment), "latest" or a parent run id, as for
    `adaptflow compare --study`.
    """
    uri = resolve_tracking_uri(tracking_uri)
    markdown = compare_experiment(experiment, uri, baseline, by, study, out_dir)
    print(markdown)
    return markdown
