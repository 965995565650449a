"""Compare: read a study's child runs back from MLflow and answer its question.

Accuracy per algorithm x target x shots with seed-aware 95% intervals (seeds are the replicates,
episodes nested in them), the best per column marked, the average over targets, paired tests of
each algorithm against a baseline on the same seeds and proven-identical episodes with
Holm-Bonferroni correction, and average ranks with Friedman's test. Runs evaluated under different
protocols (anything that changes the data or the episodes) are never mixed.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from scipy import stats

from adaptflow.errors import StudyError
from metalib.statistics import (
    MIN_SEEDS_TO_TEST,
    PAIRED_METHOD,
    Friedman,
    friedman_nemenyi,
    holm,
    one_sample_p,
    paired_difference,
    t_half_width,
    tied_ranks,
    wilcoxon_p,
)
from tasks.report import EPISODES_ARTIFACT
from tasks.summary import interval_caption, summarise
from tasks.tables import accuracy_table, fit_to_terminal, to_markdown

logger = logging.getLogger(__name__)

KEYS = ["algorithm", "source_domains", "target_domain", "shots", "seed"]
CELL = ["source_domains", "target", "shots"]  # one cell of the comparison; seeds are its replicates
# What must agree across the whole comparison for accuracies to be comparable. Every `data.*` setting
# (which decides the rows, their preprocessing and so the episodes) must agree within each domain pair:
# different pairs already differ in their data, so a setting of one source (dslr's val_fraction) may too.
PROTOCOL = [
    "episodes.ways",
    "episodes.queries",
    "episodes.eval_episodes",
    "train.val_episodes",
    "model_selection",
    "normalisation",
]
ALPHA = 0.05
MIN_FRIEDMAN = (3, 4)  # algorithms, cells: fewer and no Friedman test or critical-difference plot
FORMATS = ("table", "markdown", "csv", "latex")


@dataclass(frozen=True)
class Comparison:
    """The runs compared (one row each, with per-episode accuracies), their summary, the paired tests
    against the baseline (per algorithm, and per cell), and the ranks."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    paired: pd.DataFrame
    paired_cells: pd.DataFrame
    ranks: pd.DataFrame
    friedman: Friedman | None  # None when there are too few algorithms or cells (friedman_note says so)
    friedman_note: str
    baseline: str
    by: list[str]


def complete(run: Run) -> bool:
    """A run whose artifacts are all in: it logs `acc` last and ends FINISHED only then."""
    return run.info.status == "FINISHED" and "acc" in run.data.metrics


def experiment_names(experiments: str | Sequence[str]) -> list[str]:
    return [experiments] if isinstance(experiments, str) else list(experiments)


def load_runs(client: MlflowClient, experiments: str | Sequence[str], study: str = "all") -> pd.DataFrame:
    """The latest child run per (algorithm, source, target, shots, seed), with its episode accuracies.

    Several experiments are read together, so that runs logged under different names (a spec's
    defaults and its search) are compared on the same episodes. `study` narrows the runs to one study
    execution: "latest" (of each experiment), or a parent run id; "all" keeps every one.
    """
    names = experiment_names(experiments)
    experiment = ", ".join(names)  # for messages
    runs: list[Run] = []
    for name in names:
        found = client.get_experiment_by_name(name)
        if found is None:
            known = [e.name for e in client.search_experiments()]
            raise StudyError(f"no MLflow experiment named {name!r}; the store has: {known}")
        query = "tags.kind = 'evaluation'"
        if study != "all":
            parent = latest_study_run(client, name) if study == "latest" else study
            query += f" and tags.`mlflow.parentRunId` = '{parent}'"
        found_runs = client.search_runs([found.experiment_id], filter_string=query, max_results=50000)
        if len(names) > 1 and study != "all" and not found_runs:  # else the table would look complete
            raise StudyError(
                f"experiment {name!r} has no evaluated runs of study {study!r}; with several experiments "
                "use --study all or latest"
            )
        runs += found_runs
    incomplete = [run.info.run_name for run in runs if not complete(run)]
    if incomplete:
        logger.warning(
            "skipping %d incomplete evaluation run(s) (not FINISHED with acc): %s",
            len(incomplete),
            ", ".join(incomplete[:10]) + (" …" if len(incomplete) > 10 else ""),
        )
    runs = [run for run in runs if complete(run)]
    protocol = sorted(
        {key for run in runs for key in run.data.params if key.startswith("data.")} | set(PROTOCOL)
    )
    rows = [
        {
            **{key: run.data.tags.get(key) for key in KEYS},
            **{key: run.data.params.get(key, run.data.tags.get(key)) for key in protocol},
            "episodes_digest": run.data.tags.get("episodes_digest"),
            "acc": run.data.metrics.get("acc"),
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "start_time": run.info.start_time,
        }
        for run in runs
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
    check_protocol(frame, protocol)
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
    experiments: str | Sequence[str],
    baseline: str = "finetune",
    by: list[str] | None = None,
    study: str = "all",
) -> Comparison:
    """Everything `adaptflow compare` shows. Rows keep the order in which the algorithms were first
    run (the spec's order for one study execution)."""
    runs = load_runs(client, experiments, study)
    experiment = ", ".join(experiment_names(experiments))  # for messages
    by = [("target" if key == "target_domain" else key) for key in (by or ["algorithm", "target", "shots"])]
    unknown = sorted(set(by) - {"algorithm", "target", "shots", "seed", "source_domains"})
    if unknown or "algorithm" not in by:
        raise StudyError(
            f"--by {','.join(by)}: group by 'algorithm' plus any of "
            "target_domain, shots, seed, source_domains"
        )
    algorithms = list(dict.fromkeys(runs.algorithm))
    if baseline not in algorithms:
        raise StudyError(f"baseline {baseline!r} has no runs in {experiment!r}; it has: {sorted(algorithms)}")
    paired, paired_cells = paired_tests(runs, baseline)
    ranks, friedman, note = rank_algorithms(runs)
    return Comparison(runs, summarise(runs, by), paired, paired_cells, ranks, friedman, note, baseline, by)


def paired_tests(
    runs: pd.DataFrame, baseline: str, alpha: float = ALPHA
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each algorithm against the baseline, seeds as the replicates, with Holm-Bonferroni over all tests.

    In each cell (source, target, shots) a seed pairs the two algorithms' runs only when their
    episode digests prove they met the same episodes; within the seed, episode differences are
    averaged, and the per-seed differences are tested across seeds (paired t, df = seeds - 1).
    Per algorithm: the same over the cell-averaged differences of the seeds present in every cell,
    and a Wilcoxon signed-rank check over the (seed, cell) differences. Every p-value of the table
    (cells, overall, Wilcoxon) is one Holm-Bonferroni family; W/T/L counts cells significantly
    better / not significant / worse after that correction. Returns (per algorithm, per cell).
    """
    reference = runs[runs.algorithm == baseline].set_index([*CELL, "seed"])
    cell_rows, overall_rows = [], []
    for algorithm, mine in runs[runs.algorithm != baseline].groupby("algorithm", sort=False):
        per_seed_cell: dict[tuple, dict[int, float]] = {}
        for cell, members in mine.groupby(CELL):
            shared = [row for _, row in members.iterrows() if (*cell, row.seed) in reference.index]
            if not shared:
                continue
            base = [reference.loc[(*cell, row.seed)] for row in shared]
            for row, other in zip(shared, base):
                if row.episodes_digest != other.episodes_digest:
                    raise StudyError(
                        f"runs {row.run_name} and {other.run_name} did not meet the same evaluation episodes "
                        f"(episode digests {str(row.episodes_digest)[:12]} and "
                        f"{str(other.episodes_digest)[:12]}), "
                        "so they cannot be paired; rerun both with the same code and spec, or compare one "
                        "study run (--study latest or a parent run id)"
                    )
            test = paired_difference([row.accuracies for row in shared], [other.accuracies for other in base])
            per_seed_cell[cell] = {
                row.seed: float((row.accuracies - other.accuracies).mean())
                for row, other in zip(shared, base)
            }
            cell_rows.append(
                {
                    "algorithm": algorithm,
                    **dict(zip(CELL, cell)),
                    "difference": test.difference,
                    "ci95": test.half_width,
                    "p_value": test.p_value,
                    "seeds": test.seeds,
                }
            )
        if not per_seed_cell:
            continue
        seeds = sorted(set.intersection(*(set(values) for values in per_seed_cell.values())))
        overall = np.array([np.mean([values[seed] for values in per_seed_cell.values()]) for seed in seeds])
        differences = [value for values in per_seed_cell.values() for value in values.values()]
        overall_rows.append(
            {
                "algorithm": algorithm,
                "baseline": baseline,
                "difference": float(overall.mean()) if len(overall) else float("nan"),
                "ci95": t_half_width(overall),
                "p_value": one_sample_p(overall) if len(overall) >= MIN_SEEDS_TO_TEST else None,
                "wilcoxon_p": wilcoxon_p(differences),
                "seeds": len(seeds),
                "cells": len(per_seed_cell),
            }
        )
    cells, overall = pd.DataFrame(cell_rows), pd.DataFrame(overall_rows)
    if overall.empty:
        return overall, cells
    tested = [
        (frame, column, index)
        for frame, columns in ((cells, ["p_value"]), (overall, ["p_value", "wilcoxon_p"]))
        for column in columns
        for index in frame.index
        if pd.notna(frame.at[index, column])
    ]
    adjusted = holm([frame.at[index, column] for frame, column, index in tested])
    for frame, column in ((cells, "p_value"), (overall, "p_value"), (overall, "wilcoxon_p")):
        frame[f"{column}_holm"] = None
    for (frame, column, index), value in zip(tested, adjusted):
        frame.at[index, f"{column}_holm"] = value
    cells["verdict"] = [
        "too few seeds"
        if p is None
        else "win"
        if p < alpha and d > 0
        else "loss"
        if p < alpha and d < 0
        else "tie"
        for p, d in zip(cells.p_value_holm, cells.difference)
    ]
    overall["win_tie_loss"] = [
        "/".join(str(int((verdicts == name).sum())) for name in ("win", "tie", "loss"))
        if (verdicts := cells.verdict[cells.algorithm == algorithm]).ne("too few seeds").all()
        else "too few seeds"
        for algorithm in overall.algorithm
    ]
    overall.attrs["tests"] = len(tested)
    return overall, cells


def rank_algorithms(runs: pd.DataFrame) -> tuple[pd.DataFrame, Friedman | None, str]:
    """Average rank of each algorithm over the cells every algorithm has, ties where differences are
    not significant (Meta-Dataset's rule on seed-aware standard errors), and Friedman's test with the
    Nemenyi critical difference (Demsar 2006) when there are enough algorithms and cells."""
    summary = summarise(runs, ["algorithm", *CELL])
    algorithms = list(dict.fromkeys(summary.algorithm))
    complete = summary.groupby(CELL).filter(lambda cell: set(cell.algorithm) == set(algorithms))
    if complete.empty:
        return pd.DataFrame(columns=["algorithm", "avg_rank"]), None, "no cell has every algorithm: no ranks"
    ranked = []
    for _, cell in complete.groupby(CELL):
        errors = [_standard_error(row) for _, row in cell.iterrows()]
        ranked.append(pd.Series(tied_ranks(list(cell.acc), errors), index=cell.algorithm))
    ranks = pd.concat(ranked, axis=1)
    table = pd.DataFrame(
        {"algorithm": algorithms, "avg_rank": [ranks.loc[name].mean() for name in algorithms]}
    )
    table = table.sort_values("avg_rank", kind="stable").reset_index(drop=True)
    count = ranks.shape[1]
    if len(algorithms) < MIN_FRIEDMAN[0] or count < MIN_FRIEDMAN[1]:
        note = f"needs {MIN_FRIEDMAN[0]}+ algorithms and {MIN_FRIEDMAN[1]}+ cells with all of them"
        return table, None, f"Friedman test: {note}, have {len(algorithms)} and {count}"
    accuracy = {name: list(complete[complete.algorithm == name].sort_values(CELL).acc) for name in algorithms}
    test = friedman_nemenyi(accuracy)
    return (
        table,
        test,
        (
            f"Friedman test over {test.cells} cells (they share their trained models: descriptive): "
            f"chi2 = {test.statistic:.2f}, p = {test.p_value:.3g}; "
            f"Nemenyi critical difference of mean ranks (alpha {ALPHA}) = {test.critical_difference:.2f}"
        ),
    )


def _standard_error(row: pd.Series) -> float:
    """The standard error of a summary row's mean: of its seed means, or of one seed's episodes."""
    if row.seeds > 1:
        return row.seed_std / np.sqrt(row.seeds)
    return row.ci95 / stats.norm.ppf(0.975)


def _p(value: float | None) -> str:
    if value is None or pd.isna(value):
        return "too few seeds to test"
    return f"{value:.3g}" if value > 0 else "<1e-300"


def render(comparison: Comparison, fmt: str = "table") -> str:
    """The accuracy table, the paired tests and the ranks as plain text, markdown or LaTeX; csv gives
    the tidy summary alone (write_outputs writes the other tables to their own files)."""
    if fmt not in FORMATS:
        raise StudyError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return comparison.summary.to_csv(index=False)
    latex = fmt == "latex"
    wide = accuracy_table(
        comparison.summary,
        comparison.by,
        average_targets=True,
        mark_best=fmt if fmt in ("markdown", "latex") else None,
        plus_minus="$\\pm$" if latex else "±",
    )
    delta = "$\\Delta$" if latex else "Δ"
    paired = comparison.paired
    shown = pd.DataFrame(
        {
            "algorithm": paired.get("algorithm", []),
            f"{delta} acc (points)": [f"{100 * d:+.1f}" for d in paired.get("difference", [])],
            "95% CI": [f"{100 * h:.1f}" if pd.notna(h) else "–" for h in paired.get("ci95", [])],
            "p (paired t, seeds)": [_p(p) for p in paired.get("p_value", [])],
            "p Holm": [_p(p) for p in paired.get("p_value_holm", [])],
            "p Wilcoxon (cells)": [_p(p) for p in paired.get("wilcoxon_p_holm", [])],
            "seeds": paired.get("seeds", []),
            "W/T/L": paired.get("win_tie_loss", []),
        }
    )
    tests = paired.attrs.get("tests", 0)
    notes = [
        f"Intervals: {interval_caption(comparison.summary).removeprefix('accuracy % ± 95% CI, ')}.",
        f"vs baseline {comparison.baseline}: {PAIRED_METHOD} on the same seeds and episodes (checked by "
        f"digest); Wilcoxon signed-rank over (seed, target, shots) cells, a check only (a seed's cells share "
        f"one trained model); Holm-Bonferroni over all {tests} "
        f"p-values of this table (Wilcoxon column shown corrected); W/T/L counts cells significantly better, "
        f"not significant, worse after correction at alpha {ALPHA}; fewer than {MIN_SEEDS_TO_TEST} shared "
        "seeds: no test.",
    ]
    ranks = comparison.ranks.assign(avg_rank=[f"{r:.2f}" for r in comparison.ranks.avg_rank])
    rank_note = "Average rank over cells (1 = best; tied within 1.96 combined standard errors)."
    if fmt == "markdown":
        parts = [
            to_markdown(wide),
            notes[0],
            notes[1],
            to_markdown(shown),
            rank_note,
            to_markdown(ranks),
            comparison.friedman_note,
        ]
        return "\n\n".join(parts)
    if latex:
        notes = [note.replace("%", "\\%").replace("_", "\\_") for note in notes]
        return "\n".join(
            [
                wide.to_latex(escape=False),
                "% " + notes[0],
                "% " + notes[1],
                shown.to_latex(index=False, escape=False),
                ranks.to_latex(index=False),
            ]
        )
    return "\n\n".join(
        [
            fit_to_terminal(wide),
            notes[0],
            notes[1],
            fit_to_terminal(shown, index=False),
            rank_note,
            ranks.to_string(index=False),
            comparison.friedman_note,
        ]
    )


def check_protocol(frame: pd.DataFrame, protocol: list[str]) -> None:
    """Refuses to mix runs whose evaluation protocol differs, or whose data settings differ within one
    (source, target) pair, naming the runs on each side."""
    problems = []
    for key in protocol:
        pairs = ["source_domains", "target_domain"] if key.startswith("data.") else []
        for pair, rows in frame.groupby(pairs) if pairs else [((), frame)]:
            groups = rows.groupby(rows[key].fillna("(unset)")).run_name.apply(list)
            if len(groups) > 1:
                where = f" ({' -> '.join(pair)})" if pairs else ""
                sides = "; ".join(
                    f"{value}: {', '.join(names[:4])}{' …' if len(names) > 4 else ''}"
                    for value, names in groups.items()
                )
                problems.append(f"  {key} differs{where} — {sides}")
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
    """Writes the comparison in `fmt`, its tables as tidy CSV files and the plots to `out_dir`, and logs
    them to the latest study parent run of `experiment` (the first, when several were compared)."""
    from tasks.plots import accuracy_heatmap, accuracy_vs_shots, critical_difference

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(comparison.runs)
    suffix = {"table": "txt", "markdown": "md", "csv": "csv", "latex": "tex"}[fmt]
    table = out_dir / f"comparison.{suffix}"
    table.write_text(render(comparison, fmt))
    files = [table]
    for frame, name in (
        (comparison.paired, "paired"),
        (comparison.paired_cells, "paired_cells"),
        (comparison.ranks, "ranks"),
    ):
        files.append(out_dir / f"comparison_{name}.csv")
        frame.to_csv(files[-1], index=False)
    files += [
        accuracy_vs_shots(summary, out_dir / "accuracy_vs_shots.png"),
        accuracy_heatmap(summary, out_dir / "accuracy_heatmap.png"),
    ]
    if comparison.friedman is not None:
        files.append(critical_difference(comparison.friedman, out_dir / "critical_difference.png"))
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
