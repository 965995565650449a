"""The `adaptflow` command: run or validate a study spec, compare an experiment's runs."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from adaptflow import settings
from adaptflow.errors import StudyError
from adaptflow.redact import has_secret, redact
from adaptflow.spec import StudySpec, load_spec


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
        help="compare an experiment's runs: seed-aware 95%% CIs, corrected paired tests, ranks, plots",
        description="Reads the experiment's child runs from MLflow (the latest per algorithm, source, "
        "target, shots and seed) and prints accuracy with seed-aware 95% intervals (seeds are the "
        "replicates), paired tests against a baseline with Holm-Bonferroni correction, and average ranks "
        "with Friedman's test; writes them with plots to --out (also logged to the latest study run). "
        "docs/statistics.md explains the methods.",
    )
    compare.add_argument("experiment", help="MLflow experiment name (the spec's `name`)")
    compare.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default as for run)")
    compare.add_argument(
        "--format",
        default="table",
        choices=["table", "markdown", "csv", "latex"],
        help="output format of the tables (default: table); csv prints the tidy summary only",
    )
    compare.add_argument(
        "--by",
        default="algorithm,target_domain,shots",
        help="grouping: algorithm first (rows), then any of target_domain, shots, seed, source_domains",
    )
    compare.add_argument(
        "--per-seed",
        action="store_true",
        help="group by seed as well: each seed's mean per cell with its episode interval (instead of "
        "the seed-aware interval), to see the spread behind the intervals",
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

    spec = _load(spec_path, overrides)
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


def _load(spec_path: str, overrides: list[str]) -> StudySpec:
    """The spec with its overrides; an override holding a credential is refused by `validate` and
    `run` alike, since `run` hands overrides to Prefect, which stores them as flow parameters."""
    secret = [repr(redact(item)) for item in overrides if has_secret(item)]
    if secret:
        raise StudyError(
            f"--set {', '.join(secret)}: a --set value holds a credential, and Prefect would store it as a "
            "flow parameter. Put the value in the spec file, or the credential in the environment "
            "(e.g. HF_TOKEN, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD)."
        )
    return load_spec(spec_path, overrides)


def _run(spec_path: str, overrides: list[str], tracking_uri: str | None) -> int:
    from flows.study import study, validate_study
    from tasks.report import format_table
    from tasks.summary import interval_caption

    spec = _load(spec_path, overrides)
    validate_study(spec)  # fail fast, before a Prefect server starts or MLflow is touched
    uri = tracking_uri or settings.default_tracking_uri()
    if has_secret(uri):  # Prefect stores flow parameters: a URI with credentials goes by the environment
        os.environ["MLFLOW_TRACKING_URI"] = uri
    started = time.perf_counter()
    rows = study(
        spec=str(Path(spec_path)), overrides=overrides, tracking_uri=None if has_secret(uri) else uri
    )
    import pandas as pd

    print(
        f"\n{spec.name}: {spec.episodes.ways}-way, {spec.episodes.queries} queries, "
        f"{spec.episodes.eval_episodes} target episodes per seed, seeds {spec.seeds}"
    )
    summary = pd.DataFrame(rows)
    print(f"{interval_caption(summary)}:\n")
    print(format_table(summary))
    print(f"\nstudy took {time.perf_counter() - started:.1f} s. Open the results:")
    print(f"  mlflow ui --backend-store-uri {redact(uri)}")
    if os.environ.get("PREFECT_API_URL"):
        print(f"  the Prefect UI of {redact(os.environ['PREFECT_API_URL'].removesuffix('/api'))}")
    else:
        print(
            f"  PREFECT_HOME={os.environ['PREFECT_HOME']} prefect server start   # then http://127.0.0.1:4200"
        )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from tasks.compare import compare, render, write_outputs

    client = MlflowClient(tracking_uri=args.tracking_uri or settings.default_tracking_uri())
    by = args.by.split(",") + (["seed"] if args.per_seed and "seed" not in args.by else [])
    comparison = compare(client, args.experiment, args.baseline, by, args.study)
    print(render(comparison, args.format))
    files = write_outputs(client, args.experiment, comparison, args.format, Path(args.out))
    print("\nwritten: " + ", ".join(str(path) for path in files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
