"""The `adaptflow` command: run or validate a study spec."""

from __future__ import annotations

import argparse
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
                help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)",
            )
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            return _validate(args.spec, args.overrides)
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
    print(
        f"  PREFECT_HOME={settings.DEFAULTS['PREFECT_HOME']} prefect server start   # then http://127.0.0.1:4200"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
