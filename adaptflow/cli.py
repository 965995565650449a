"""The `adaptflow` command: run or validate a study spec, compare an experiment's runs."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from adaptflow import settings
from adaptflow.errors import StudyError
from adaptflow.spec import load_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="adaptflow", description="Few-shot domain-adaptation studies on Prefect and MLflow."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run a study spec end to end (prepare, train, evaluate, report)"),
        ("validate", "check a study spec and its data without training"),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("spec", help="path of a YAML study spec (see studies/)")
        command.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY.PATH=VALUE",
            help="override a spec value, e.g. --set train.steps=50 (repeatable)",
        )
        if name == "run":
            command.add_argument(
                "--tracking-uri",
                default=None,
                help="MLflow URI (default: $MLFLOW_TRACKING_URI, else mlflow.db in $ADAPTFLOW_HOME or .)",
            )
    compare = commands.add_parser(
        "compare",
        help="compare an experiment's runs: accuracy ± 95%% CI, paired tests against a baseline, plots",
        description="Reads the experiment's child runs from MLflow (the latest per algorithm, source, "
        "target, shots and seed), prints the comparison, and writes it with two plots to --out "
        "(also logged to the latest study run).",
    )
    compare.add_argument("experiment", help="MLflow experiment name (the spec's `name`)")
    compare.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default as for run)")
    compare.add_argument(
        "--format",
        default="table",
        choices=["table", "markdown", "csv", "latex"],
        help="output format of the table and the paired tests (default: table)",
    )
    compare.add_argument(
        "--by",
        default="algorithm,target_domain,shots",
        help="grouping: algorithm first (rows), then any of target_domain, shots, seed, source_domains",
    )
    compare.add_argument("--baseline", default="finetune", help="algorithm the others are tested against")
    compare.add_argument(
        "--study",
        default="all",
        help="'all' study runs of the experiment (latest result per cell), 'latest', or a parent run id",
    )
    compare.add_argument("--out", default="reports", help="folder for the table and plots (default reports/)")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            return _validate(args.spec, args.overrides)
        if args.command == "compare":
            return _compare(args)
        return _run(args.spec, args.overrides, args.tracking_uri)
    except StudyError as exc:
        print(f"adaptflow: error: {exc}", file=sys.stderr)
        return 2


def _validate(spec_path: str, overrides: list[str]) -> int:
    from flows.study import validate_study

    spec = load_spec(spec_path, overrides)
    prepared = validate_study(spec)
    classes = len(prepared.class_names)
    print(f"{spec_path}: valid. {classes} classes; rows per domain: {prepared.rows_per_domain}")
    print(
        f"source pools: {len(prepared.source_train)} training / {len(prepared.source_val)} validation rows; "
        f"{len(spec.algorithms)} algorithms x {len(spec.seeds)} seeds x {len(spec.target)} targets "
        f"x {len(spec.episodes.shots)} shot counts = "
        f"{len(spec.algorithms) * len(spec.seeds) * len(spec.target) * len(spec.episodes.shots)} evaluations"
    )
    return 0


def _run(spec_path: str, overrides: list[str], tracking_uri: str | None) -> int:
    from flows.study import study, validate_study
    from tasks.report import format_table

    spec = load_spec(spec_path, overrides)
    validate_study(spec)  # fail fast, before a Prefect server starts or MLflow is touched
    uri = tracking_uri or settings.default_tracking_uri()
    started = time.perf_counter()
    rows = study(spec=str(Path(spec_path)), overrides=overrides, tracking_uri=uri)
    import pandas as pd

    print(
        f"\n{spec.name}: {spec.episodes.ways}-way, {spec.episodes.queries} queries, "
        f"{spec.episodes.eval_episodes} target episodes per seed, seeds {spec.seeds}"
    )
    print("accuracy % ± 95% CI over all evaluation episodes:\n")
    print(format_table(pd.DataFrame(rows)))
    print(f"\nstudy took {time.perf_counter() - started:.1f} s. Open the results:")
    print(f"  mlflow ui --backend-store-uri {uri}")
    if os.environ.get("PREFECT_API_URL"):
        print(f"  the Prefect UI of {os.environ['PREFECT_API_URL'].removesuffix('/api')}")
    else:
        print(
            f"  PREFECT_HOME={os.environ['PREFECT_HOME']} prefect server start   # then http://127.0.0.1:4200"
        )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from tasks.compare import compare, render, write_outputs

    client = MlflowClient(tracking_uri=args.tracking_uri or settings.default_tracking_uri())
    comparison = compare(client, args.experiment, args.baseline, args.by.split(","), args.study)
    print(render(comparison, args.format))
    files = write_outputs(client, args.experiment, comparison, args.format, Path(args.out))
    print("\nwritten: " + ", ".join(str(path) for path in files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
