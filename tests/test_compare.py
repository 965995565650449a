"""`adaptflow compare` on experiments built by running real tiny studies."""

from __future__ import annotations

import colorsys
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from prefect.artifacts import Artifact
from scipy import stats

from adaptflow.cli import main
from adaptflow.errors import StudyError
from flows.compare import compare_flow
from tasks.compare import check_protocol, compare, paired_tests, render
from tasks.plots import distinct_colours
from tasks.report import format_table
from tasks.tables import accuracy_table
from tests.conftest import DEMO, TINY_TRAINING, cli_overrides, stop

pytestmark = pytest.mark.slow

TINY = cli_overrides(*TINY_TRAINING, "episodes.eval_episodes=20")
# One target and one shot count: enough cells for the tests of which runs compare may mix.
ONE_CELL = cli_overrides("target=[webcam]", "episodes.shots=[1]")
Experiment = tuple[MlflowClient, Path]
ALGORITHMS = "algorithms=[{name: protonet}, {name: source_only}, {name: finetune, adapt_steps: 10}]"


@pytest.fixture(scope="module")
def experiment(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Experiment:
    folder = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    args = [*TINY, "--set", ALGORITHMS, "--set", "seeds=[0, 1, 2]", "--set", "name=compare-test"]
    assert main(["run", str(DEMO), *args, "--tracking-uri", uri]) == 0
    return MlflowClient(tracking_uri=uri), folder


def episode_accuracies(client: MlflowClient, run_id: str, folder: Path) -> list[float]:
    return json.loads(
        Path(client.download_artifacts(run_id, "episode_accuracies.json", str(folder))).read_text()
    )


def test_table_and_confidence_intervals_match_the_runs(experiment: Experiment, tmp_path: Path) -> None:
    client, _ = experiment
    comparison = compare(client, "compare-test")
    summary = comparison.summary
    assert len(summary) == 3 * 2 * 2  # algorithms x targets x shots
    runs = client.search_runs(
        [client.get_experiment_by_name("compare-test").experiment_id], "tags.kind = 'evaluation'"
    )
    for _, row in summary.iterrows():
        members = [
            r for r in runs
            if (r.data.tags["algorithm"], r.data.tags["target_domain"], int(r.data.tags["shots"]))
            == (row.algorithm, row.target, row.shots)
        ]  # fmt: skip
        assert len(members) == 3  # three seeds, the replicates
        per_seed = [episode_accuracies(client, r.info.run_id, tmp_path) for r in members]
        means = [sum(episodes) / len(episodes) for episodes in per_seed]
        assert row.acc == pytest.approx(sum(means) / 3)
        assert row.acc == pytest.approx(sum(r.data.metrics["acc"] for r in members) / 3)
        low, high = stats.t.interval(0.95, 2, loc=row.acc, scale=stats.sem(means))
        assert row.ci95 == pytest.approx((high - low) / 2)  # seed-aware: t over the 3 seed means
        assert row.ci_method.startswith("t interval over per-seed means")
        assert row.episode_ci95 == pytest.approx(
            sum(stats.norm.ppf(0.975) * stats.tstd(x) / math.sqrt(len(x)) for x in per_seed) / 3
        )  # the per-model interval papers report, averaged over the seeds


def test_paired_test_against_the_baseline_matches_a_hand_computation(
    experiment: Experiment, tmp_path: Path
) -> None:
    client, _ = experiment
    comparison = compare(client, "compare-test", baseline="finetune")
    paired = comparison.paired.set_index("algorithm")
    assert set(paired.index) == {"protonet", "source_only"}
    runs = client.search_runs(
        [client.get_experiment_by_name("compare-test").experiment_id], "tags.kind = 'evaluation'"
    )
    by_algorithm: dict[str, dict] = {}
    for run in runs:
        tags = run.data.tags
        cell = (tags["target_domain"], int(tags["shots"]))
        accuracies = episode_accuracies(client, run.info.run_id, tmp_path)
        by_algorithm.setdefault(tags["algorithm"], {})[(cell, int(tags["seed"]))] = accuracies
    mine, base = by_algorithm["protonet"], by_algorithm["finetune"]
    cells = sorted({cell for cell, _ in base})

    def difference(cell: tuple, seed: int) -> float:
        return sum(a - b for a, b in zip(mine[(cell, seed)], base[(cell, seed)])) / len(base[(cell, seed)])

    # seeds are the replicates: one cell-averaged difference per seed, a t test across the 3 seeds
    per_seed = [sum(difference(cell, seed) for cell in cells) / len(cells) for seed in (0, 1, 2)]
    assert paired.at["protonet", "difference"] == pytest.approx(sum(per_seed) / 3)
    assert paired.at["protonet", "p_value"] == pytest.approx(stats.ttest_1samp(per_seed, 0).pvalue)
    assert paired.at["protonet", "seeds"] == 3 and paired.at["protonet", "cells"] == 4
    every_cell = [difference(cell, seed) for cell in cells for seed in (0, 1, 2)]
    assert paired.at["protonet", "wilcoxon_p"] == pytest.approx(stats.wilcoxon(every_cell).pvalue)
    # Holm over every p-value of the table: 2 algorithms x (4 cells + overall + Wilcoxon)
    cells_table = comparison.paired_cells
    family = [*cells_table.p_value, *comparison.paired.p_value, *comparison.paired.wilcoxon_p]
    assert len(family) == 12
    smallest = min(family)
    assert (
        min([*cells_table.p_value_holm, *comparison.paired.p_value_holm]) >= min(1.0, 12 * smallest) - 1e-12
    )
    wins, ties, losses = map(int, paired.at["protonet", "win_tie_loss"].split("/"))
    assert wins + ties + losses == 4  # one verdict per target x shots cell
    protonet_cells = cells_table[cells_table.algorithm == "protonet"]
    significant = protonet_cells[protonet_cells.p_value_holm < 0.05]
    assert wins == (significant.difference > 0).sum() and losses == (significant.difference < 0).sum()


def test_too_few_seeds_to_test(experiment: Experiment) -> None:
    client, _ = experiment
    comparison = compare(client, "compare-test", baseline="finetune")
    two_seeds = comparison.runs[comparison.runs.seed < 2]
    paired, cells = paired_tests(two_seeds, "finetune")
    assert paired.p_value.isna().all() and cells.p_value.isna().all()
    assert set(paired.win_tie_loss) == {"too few seeds"}
    disjoint = comparison.runs[(comparison.runs.target == "dslr") == (comparison.runs.seed < 2)]
    paired, _ = paired_tests(disjoint, "finetune")  # no seed is in every cell: no overall test, no crash
    assert (paired.seeds == 0).all() and paired.p_value.isna().all() and paired.ci95.isna().all()
    paired, cells = paired_tests(two_seeds, "finetune")
    assert "too few seeds to test" in render(
        dataclasses.replace(comparison, paired=paired, paired_cells=cells), "table"
    )


def test_formats_mark_the_best_and_average_over_targets(experiment: Experiment) -> None:
    client, _ = experiment
    comparison = compare(client, "compare-test")
    markdown = render(comparison, "markdown")
    header = markdown.splitlines()[0]
    rows = [line.split("|")[1].strip() for line in markdown.splitlines()[2:5]]
    assert rows == ["protonet", "source_only", "finetune"]  # the spec's order
    assert "avg 1-shot" in header and "avg 5-shot" in header and "dslr 5-shot" in header
    for shots in (1, 5):
        cells = comparison.summary[comparison.summary.shots == shots]
        best = cells.loc[cells.groupby("target").acc.idxmax()]
        for _, row in best.iterrows():
            assert f"**{100 * row.acc:.1f} ± {100 * row.ci95:.1f}**" in markdown
    latex = render(comparison, "latex")
    assert "\\textbf{" in latex and "$\\pm$" in latex and "$\\Delta$" in latex
    assert "±" not in latex and "Δ" not in latex  # pdflatex cannot read them raw
    csv_text = render(comparison, "csv")  # one tidy table
    assert csv_text.splitlines()[0].startswith("algorithm,target,shots,acc,ci95,ci_method,episode_ci95")
    assert len(csv_text.strip().splitlines()) == 1 + 3 * 2 * 2
    by_shots = compare(client, "compare-test", by=["algorithm", "shots"]).summary
    assert len(by_shots) == 3 * 2 and set(by_shots.runs) == {6}  # 2 targets x 3 seeds
    assert set(by_shots.seeds) == {3}  # a seed's runs on two targets are one replicate, not two
    per_seed = compare(client, "compare-test", by=["algorithm", "target", "shots", "seed"])
    assert len(per_seed.summary) == 3 * 2 * 2 * 3 and set(per_seed.summary.runs) == {1}
    assert "seed=2" in render(per_seed, "table")


def test_cli_writes_table_and_plots_and_logs_them(
    experiment: Experiment, capsys: pytest.CaptureFixture[str]
) -> None:
    client, folder = experiment
    out = folder / "report"
    uri = client.tracking_uri
    assert (
        main(["compare", "compare-test", "--tracking-uri", uri, "--format", "markdown", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "vs baseline finetune" in printed and "| protonet |" in printed
    for name in ("comparison.md", "comparison_paired.csv", "comparison_ranks.csv", "accuracy_vs_shots.png",
                 "accuracy_heatmap.png", "critical_difference.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0
    assert (out / "accuracy_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    experiment_id = client.get_experiment_by_name("compare-test").experiment_id
    parent = client.search_runs([experiment_id], "tags.kind = 'study'")[0]
    logged = {item.path for item in client.list_artifacts(parent.info.run_id, "compare")}
    assert {
        "compare/accuracy_vs_shots.png",
        "compare/accuracy_heatmap.png",
        "compare/comparison.md",
    } <= logged


def test_runs_of_two_experiments_compare_together_on_the_same_episodes(
    experiment: Experiment, capsys: pytest.CaptureFixture[str]
) -> None:
    """A spec's defaults and a variant logged under another name (as a search study is): one table,
    and the variant tested against the first experiment's baseline, paired on the same episodes."""
    client, folder = experiment
    uri = client.tracking_uri
    variant = "algorithms=[{name: protonet, label: protonet_cosine, distance: cosine}]"
    args = [*TINY, "--set", variant, "--set", "seeds=[0, 1, 2]", "--set", "name=compare-variant"]
    assert main(["run", str(DEMO), *args, "--tracking-uri", uri]) == 0
    both = compare(client, ["compare-test", "compare-variant"], baseline="finetune")
    assert list(dict.fromkeys(both.runs.algorithm)) == [
        "protonet",
        "source_only",
        "finetune",
        "protonet_cosine",
    ]
    alone = compare(client, "compare-test", baseline="finetune")
    assert set(both.paired.algorithm) == {"protonet", "source_only", "protonet_cosine"}
    tested = both.paired.set_index("algorithm")
    assert tested.loc["protonet_cosine", "seeds"] == 3  # paired: its episodes are the baseline's
    # the first experiment's own rows are unchanged by the second's
    assert tested.loc["protonet", "difference"] == pytest.approx(
        alone.paired.set_index("algorithm").loc["protonet", "difference"]
    )
    latest = compare(client, ["compare-test", "compare-variant"], study="latest")
    assert len(latest.runs) == len(both.runs)  # the latest study of each experiment
    with pytest.raises(StudyError, match="no MLflow experiment named 'compare-nope'"):
        compare(client, ["compare-test", "compare-nope"])
    one_parent = latest.runs.run_id.iloc[0]
    parent = client.get_run(one_parent).data.tags["mlflow.parentRunId"]
    with pytest.raises(StudyError, match="has no evaluated runs of study"):  # a parent is in one experiment
        compare(client, ["compare-test", "compare-variant"], study=parent)
    out = folder / "report-two"
    assert main(["compare", "compare-test", "compare-variant", "--tracking-uri", uri, "--out", str(out)]) == 0
    assert "protonet_cosine" in capsys.readouterr().out and (out / "comparison.txt").exists()


def test_refuses_to_mix_protocols(prefect_server: None, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [
        *TINY,
        *ONE_CELL,
        "--set",
        "algorithms=[{name: protonet}, {name: finetune, adapt_steps: 5}]",
        "--set",
        "name=mixed",
    ]
    assert main(["run", str(DEMO), *common, "--set", "seeds=[0]", "--tracking-uri", uri]) == 0
    assert main(["run", str(DEMO), *common, "--set", "seeds=[1]", "--set", "episodes.queries=2",
                 "--tracking-uri", uri]) == 0  # fmt: skip
    with pytest.raises(StudyError, match="different protocols") as error:
        compare(MlflowClient(tracking_uri=uri), "mixed")
    message = str(error.value)
    assert "episodes.queries differs" in message
    assert "2: " in message and "3: " in message and "seed1" in message and "seed0" in message
    latest = compare(MlflowClient(tracking_uri=uri), "mixed", study="latest").runs
    assert set(latest.seed) == {1} and set(latest.algorithm) == {"protonet", "finetune"}


def test_data_settings_must_agree_within_a_domain_pair_and_the_evaluation_protocol_everywhere() -> None:
    """dslr as a source keeps half its rows for validation, amazon a fifth: their pairs compare together,
    while two values within one pair, or two query counts anywhere, are refused."""
    frame = pd.DataFrame(
        {
            "source_domains": ["amazon", "amazon", "dslr", "dslr"],
            "target_domain": ["webcam"] * 4,
            "run_name": ["protonet·a", "finetune·a", "protonet·d", "finetune·d"],
            "data.val_fraction": ["0.2", "0.2", "0.5", "0.5"],
            "episodes.queries": ["3"] * 4,
        }
    )
    protocol = ["data.val_fraction", "episodes.queries"]
    check_protocol(frame, protocol)
    within = frame.assign(**{"data.val_fraction": ["0.2", "0.5", "0.5", "0.5"]})
    with pytest.raises(
        StudyError, match=r"data.val_fraction differs \(amazon -> webcam\) — 0.2: protonet·a; 0.5"
    ):
        check_protocol(within, protocol)
    across = frame.assign(**{"episodes.queries": ["3", "3", "5", "5"]})
    with pytest.raises(StudyError, match="episodes.queries differs — 3: protonet·a, finetune·a; 5"):
        check_protocol(across, protocol)


def test_refuses_runs_that_differ_only_in_the_split_or_in_their_episodes(
    prefect_server: None, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [*TINY, *ONE_CELL, "--set", "algorithms=[{name: protonet}, {name: source_only}]",
              "--set", "name=split", "--tracking-uri", uri]  # fmt: skip
    # seed 0 from one split of the source domains, seed 1 from another: the cells would mix them
    assert main(["run", str(DEMO), *common, "--set", "seeds=[0]"]) == 0
    assert main(["run", str(DEMO), *common, "--set", "seeds=[1]", "--set", "data.split_seed=1"]) == 0
    client = MlflowClient(tracking_uri=uri)
    with pytest.raises(StudyError, match="different protocols") as error:
        compare(client, "split", baseline="source_only")
    assert "data.split_seed differs" in str(error.value)
    assert str(error.value).count("differs") == 1  # nothing else tells the two runs apart
    latest = compare(client, "split", baseline="source_only", study="latest")
    assert set(latest.paired.algorithm) == {"protonet"}
    # a run whose recorded episodes are not the baseline's is never paired with it
    run = latest.runs[(latest.runs.algorithm == "protonet")].iloc[0]
    client.set_tag(run.run_id, "episodes_digest", "0" * 64)
    with pytest.raises(StudyError, match="did not meet the same evaluation episodes") as error:
        compare(client, "split", baseline="source_only", study="latest")
    assert run.run_name in str(error.value)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_study_and_compare_through_a_real_mlflow_server(
    prefect_server: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [
        sys.executable, "-m", "mlflow", "server", "--workers", "1",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination", str(tmp_path / "artifacts"),
    ]  # fmt: skip
    quiet = subprocess.DEVNULL
    server = subprocess.Popen(command, env=env, start_new_session=True, stdout=quiet, stderr=quiet)
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        args = [*TINY, "--set", "episodes.shots=[1]",
                "--set", "algorithms=[{name: protonet}, {name: finetune, adapt_steps: 5}]",
                "--set", "seeds=[0]", "--set", "name=over-http"]  # fmt: skip
        assert main(["run", str(DEMO), *args, "--tracking-uri", uri]) == 0
        capsys.readouterr()
        assert main(["compare", "over-http", "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
        printed = capsys.readouterr().out
        assert "protonet" in printed and "vs baseline finetune" in printed
        assert any((tmp_path / "artifacts").rglob("episode_accuracies.json"))  # stored by the server
        client = MlflowClient(uri)
        experiment_id = client.get_experiment_by_name("over-http").experiment_id
        parent = client.search_runs([experiment_id], "tags.kind = 'study'")[0].info.run_id
        table = pd.read_csv(client.download_artifacts(parent, "results.csv", str(tmp_path)))
        assert len(table) == 2 * 2  # algorithms x targets, one shot count
    finally:
        stop(server, grace=20)


def test_compare_flow_posts_the_table_as_an_artifact(experiment: Experiment) -> None:
    client, folder = experiment
    markdown = compare_flow(
        "compare-test", client.tracking_uri, baseline="protonet", study="latest", out_dir=str(folder / "flow")
    )
    with pytest.raises(StudyError, match="no evaluated runs of study run 'no-such-run'"):
        compare_flow("compare-test", client.tracking_uri, study="no-such-run", out_dir=str(folder / "flow"))
    assert markdown == render(compare(client, "compare-test", "protonet", study="latest"), "markdown")
    assert "vs baseline protonet" in markdown
    artifact = Artifact.get("comparison")
    assert artifact is not None and markdown in artifact.data
    assert (folder / "flow" / "comparison.md").read_text().strip() == markdown.strip()


def test_target_averages_only_for_rows_with_every_target() -> None:
    """A mean over fewer targets is not comparable: it is shown as '–' and never marked best."""
    summary = pd.DataFrame(
        [
            {"algorithm": "protonet", "target": "dslr", "shots": 1, "acc": 0.5, "ci95": 0.01},
            {"algorithm": "protonet", "target": "webcam", "shots": 1, "acc": 0.7, "ci95": 0.01},
            {"algorithm": "maml", "target": "dslr", "shots": 1, "acc": 0.9, "ci95": 0.01},
        ]
    )
    by = ["algorithm", "target", "shots"]
    table = accuracy_table(summary, by, average_targets=True, mark_best="markdown")
    assert list(table.index) == ["protonet", "maml"]
    assert table.at["protonet", "avg 1-shot"] == "**60.0**" and table.at["maml", "avg 1-shot"] == "–"
    assert table.at["maml", "webcam 1-shot"] == "–" and table.at["maml", "dslr 1-shot"] == "**90.0 ± 1.0**"
    by_target = accuracy_table(summary, ["algorithm", "target"], average_targets=True)
    assert list(by_target.columns) == ["dslr", "webcam", "avg"]


def test_target_averages_per_source_count_the_targets_of_that_source() -> None:
    """Studies of several sources (each evaluated on the other domains) compared together: each source's
    average is over its own targets, though the table has more targets in all."""
    summary = pd.DataFrame(
        [
            {
                "algorithm": algorithm,
                "source_domains": source,
                "target": target,
                "shots": 1,
                "acc": acc,
                "ci95": 0.01,
            }
            for algorithm, acc in (("protonet", 0.5), ("maml", 0.7))
            for source, targets in (("amazon", ["dslr", "webcam"]), ("dslr", ["amazon", "webcam"]))
            for target in targets
        ]
        + [
            {
                "algorithm": "maml",
                "source_domains": "webcam",
                "target": "dslr",
                "shots": 1,
                "acc": 0.9,
                "ci95": 0.01,
            }
        ]
    )
    by = ["algorithm", "source_domains", "target", "shots"]
    table = accuracy_table(summary, by, average_targets=True)
    assert (
        table.at["protonet", "avg amazon 1-shot"] == "50.0" and table.at["maml", "avg dslr 1-shot"] == "70.0"
    )
    assert (
        table.at["maml", "avg webcam 1-shot"] == "90.0" and table.at["protonet", "avg webcam 1-shot"] == "–"
    )


def test_target_averages_follow_the_shot_counts_in_number_order() -> None:
    summary = pd.DataFrame(
        [
            {"algorithm": "protonet", "target": target, "shots": shots, "acc": 0.5, "ci95": 0.01}
            for target in ("dvd", "kitchen")
            for shots in (1, 5, 20)
        ]
    )
    table = accuracy_table(summary, ["algorithm", "target", "shots"], average_targets=True)
    assert list(table.columns)[-3:] == ["avg 1-shot", "avg 5-shot", "avg 20-shot"]  # not 1, 20, 5


def test_a_table_too_wide_for_the_terminal_gets_a_row_per_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve text-benchmark targets at three shot counts would print 400 characters wide."""
    targets = [f"{a}->{b}" for a in ("books", "dvd", "electronics", "kitchen") for b in ("x", "y", "z")]
    summary = pd.DataFrame(
        [
            {"algorithm": algorithm, "target": target, "shots": shots, "acc": 0.5, "ci95": 0.01}
            for algorithm in ("protonet", "finetune")
            for target in targets
            for shots in (1, 5, 20)
        ]
    )
    monkeypatch.setenv("COLUMNS", "100")
    lines = format_table(summary).splitlines()
    assert max(map(len, lines)) <= 100
    assert lines[0].split() == ["1-shot", "5-shot", "20-shot"] and len(lines) == 1 + 24
    assert lines[1].startswith("books->x · protonet") and lines[2].startswith("books->x · finetune")
    monkeypatch.setenv("COLUMNS", "1000")  # wide enough: algorithms as rows, as before
    assert [line.split()[0] for line in format_table(summary).splitlines()[1:]] == ["protonet", "finetune"]


@pytest.mark.parametrize("count", [3, 10, 13, 20])
def test_the_accuracy_plot_gives_neighbouring_algorithms_different_hues(count: int) -> None:
    """The every-learner study plots 13 learners. tab20 in its own order pairs each hue with its light
    shade, so source_only and finetune (first and second) were two blues; now every colour differs
    and neighbours in the legend differ in hue (greys aside, which have none)."""
    colours = distinct_colours(count)
    assert len(set(colours)) == count
    hsv = [colorsys.rgb_to_hsv(*colour[:3]) for colour in colours]
    for (hue, saturation, _), (next_hue, next_saturation, _) in zip(hsv, hsv[1:]):
        if saturation > 0 and next_saturation > 0:
            apart = abs(hue - next_hue)
            assert min(apart, 1 - apart) > 0.06  # a tab20 hue and its light shade: 0.045 or less
