"""Compare: read a study's child runs back from MLflow and answer its question.

Accuracy per algorithm x target x shots with 95% CIs, the best per column marked, the
average over targets, and a paired test of each algorithm against a baseline on the
evaluation episodes both met. Runs evaluated under different protocols are never mixed.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from adaptflow.errors import StudyError
from metalib import paired_t_test
from tasks.report import EPISODES_ARTIFACT, summarise
from tasks.tables import accuracy_table, to_markdown

KEYS = ["algorithm", "source_domains", "target_domain", "shots", "seed"]
PROTOCOL = [  # what must agree for accuracies to be comparable
    "episodes.ways",
    "episodes.queries",
    "episodes.eval_episodes",
    "data.val_fraction",
    "data.target_unlabelled_fraction",
    "train.val_episodes",
    "model_selection",
]
FORMATS = ("table", "markdown", "csv", "latex")


@dataclass(frozen=True)
class Comparison:
    """The runs compared (one row each, with per-episode accuracies), the summary and the paired tests."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    paired: pd.DataFrame
    baseline: str
    by: list[str]


def load_runs(client: MlflowClient, experiment: str, study: str = "all") -> pd.DataFrame:
    """The latest child run per (algorithm, source, target, shots, seed), with its episode accuracies.

    `study` narrows the runs to one study execution: "latest", or a parent run id; "all" keeps every one.
    """
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise StudyError(f"no MLflow experiment named {experiment!r}; the store has: {names}")
    query = "tags.kind = 'evaluation'"
    if study != "all":
        parent = latest_study_run(client, experiment) if study == "latest" else study
        query += f" and tags.`mlflow.parentRunId` = '{parent}'"
    runs = client.search_runs([found.experiment_id], filter_string=query, max_results=50000)
    rows = [
        {
            **{key: run.data.tags.get(key) for key in KEYS},
            **{key: run.data.params.get(key, run.data.tags.get(key)) for key in PROTOCOL},
            "acc": run.data.metrics.get("acc"),
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "start_time": run.info.start_time,
        }
        for run in runs
        if "acc" in run.data.metrics
    ]
    if not rows and study not in ("all", "latest"):
        raise StudyError(
            f"no evaluated runs of study run {study!r} in experiment {experiment!r}; "
            "use --study all, latest or the run id of one of its study (parent) runs"
        )
    if not rows:
        raise StudyError(f"experiment {experiment!r} has no evaluated runs yet; run a study first")
    frame = pd.DataFrame(rows).sort_values("start_time")
    frame = frame.drop_duplicates(KEYS, keep="last").reset_index(drop=True)
    frame["shots"] = frame["shots"].astype(int)
    frame["seed"] = frame["seed"].astype(int)
    _check_protocol(frame)
    with tempfile.TemporaryDirectory() as folder:
        frame["accuracies"] = [
            torch.tensor(
                json.loads(Path(client.download_artifacts(run_id, EPISODES_ARTIFACT, folder)).read_text()),
                dtype=torch.float64,
            )
            for run_id in frame.run_id
        ]
    return frame.rename(columns={"target_domain": "target"})


def compare(
    client: MlflowClient,
    experiment: str,
    baseline: str = "finetune",
    by: list[str] | None = None,
    study: str = "all",
) -> Comparison:
    runs = load_runs(client, experiment, study)
    by = [("target" if key == "target_domain" else key) for key in (by or ["algorithm", "target", "shots"])]
    unknown = sorted(set(by) - {"algorithm", "target", "shots", "seed", "source_domains"})
    if unknown or "algorithm" not in by:
        raise StudyError(
            f"--by {','.join(by)}: group by 'algorithm' plus any of "
            "target_domain, shots, seed, source_domains"
        )
    algorithms = sorted(runs.algorithm.unique())
    if baseline not in algorithms:
        raise StudyError(f"baseline {baseline!r} has no runs in {experiment!r}; it has: {algorithms}")
    return Comparison(runs, summarise(runs, by), paired_tests(runs, baseline), baseline, by)


def paired_tests(runs: pd.DataFrame, baseline: str, alpha: float = 0.05) -> pd.DataFrame:
    """Each algorithm against the baseline on the episodes both were evaluated on.

    Pairs episode i of (source, target, shots, seed) across the two algorithms; counts a cell
    (target x shots) as a win or loss when its paired test is significant at `alpha`, else a tie.
    """
    cell_keys = ["source_domains", "target", "shots"]
    reference = runs[runs.algorithm == baseline].set_index([*cell_keys, "seed"]).accuracies
    rows = []
    for algorithm, mine in runs[runs.algorithm != baseline].groupby("algorithm"):
        wins = ties = losses = 0
        pooled_a, pooled_b = [], []
        for _, cell in mine.groupby(cell_keys):
            shared = [key for key in cell.set_index([*cell_keys, "seed"]).index if key in reference.index]
            if not shared:
                continue
            a = torch.cat([cell.set_index([*cell_keys, "seed"]).accuracies[key] for key in shared])
            b = torch.cat([reference[key] for key in shared])
            difference, p = paired_t_test(a, b)
            wins += difference > 0 and p < alpha
            losses += difference < 0 and p < alpha
            ties += p >= alpha or difference == 0
            pooled_a.append(a)
            pooled_b.append(b)
        if not pooled_a:
            continue
        difference, p = paired_t_test(torch.cat(pooled_a), torch.cat(pooled_b))
        rows.append(
            {
                "algorithm": algorithm,
                "baseline": baseline,
                "difference": difference,
                "p_value": p,
                "episodes": int(sum(len(a) for a in pooled_a)),
                "win_tie_loss": f"{wins}/{ties}/{losses}",
            }
        )
    return pd.DataFrame(rows)


def render(comparison: Comparison, fmt: str = "table") -> str:
    """The accuracy table and the paired tests as plain text, markdown, csv or LaTeX."""
    if fmt not in FORMATS:
        raise StudyError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return comparison.summary.to_csv(index=False) + "\n" + comparison.paired.to_csv(index=False)
    wide = accuracy_table(
        comparison.summary.sort_values(comparison.by[0], kind="stable"),  # rows alphabetically
        comparison.by,
        average_targets=True,
        mark_best=fmt if fmt in ("markdown", "latex") else None,
    )
    paired = comparison.paired.assign(
        difference=[f"{100 * d:+.1f}" for d in comparison.paired.get("difference", [])],
        p_value=[f"{p:.3g}" if p > 0 else "<1e-300" for p in comparison.paired.get("p_value", [])],
    ).rename(columns={"difference": "Δ acc (points)", "p_value": "p (paired t)", "win_tie_loss": "W/T/L"})
    title = f"vs baseline {comparison.baseline} (paired over shared episodes and seeds):"
    if fmt == "markdown":
        return f"{to_markdown(wide)}\n\n{title}\n\n{to_markdown(paired)}"
    if fmt == "latex":
        return wide.to_latex(escape=False) + "\n" + paired.to_latex(index=False)
    return f"{wide.to_string()}\n\n{title}\n{paired.to_string(index=False)}"


def _check_protocol(frame: pd.DataFrame) -> None:
    """Refuses to mix runs whose evaluation protocol differs, naming the runs on each side."""
    problems = []
    for key in PROTOCOL:
        groups = frame.groupby(frame[key].fillna("(unset)")).run_name.apply(list)
        if len(groups) > 1:
            sides = "; ".join(
                f"{value}: {', '.join(names[:4])}{' …' if len(names) > 4 else ''}"
                for value, names in groups.items()
            )
            problems.append(f"  {key} differs — {sides}")
    if problems:
        raise StudyError(
            "these runs were evaluated under different protocols and cannot be compared:\n"
            + "\n".join(problems)
            + "\nRerun the odd ones with the same spec settings, compare one study run (--study latest or a "
            "parent run id), or use separate experiments."
        )


def write_outputs(
    client: MlflowClient, experiment: str, comparison: Comparison, fmt: str, out_dir: Path
) -> list[Path]:
    """Writes the table and both plots to `out_dir` and logs them to the latest study parent run."""
    from tasks.plots import accuracy_heatmap, accuracy_vs_shots

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(comparison.runs)
    suffix = {"table": "txt", "markdown": "md", "csv": "csv", "latex": "tex"}[fmt]
    table = out_dir / f"comparison.{suffix}"
    table.write_text(render(comparison, fmt))
    files = [
        table,
        accuracy_vs_shots(summary, out_dir / "accuracy_vs_shots.png"),
        accuracy_heatmap(summary, out_dir / "accuracy_heatmap.png"),
    ]
    parent = latest_study_run(client, experiment)
    if parent is not None:
        for path in files:
            client.log_artifact(parent, str(path), artifact_path="compare")
    return files


def latest_study_run(client: MlflowClient, experiment: str) -> str | None:
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [found.experiment_id],
        filter_string="tags.kind = 'study'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None
