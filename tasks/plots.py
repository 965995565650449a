"""Figures people would rather look at than read."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd

from metalib.statistics import Friedman


def pyplot() -> ModuleType:
    """matplotlib's pyplot, drawing to files (Agg), imported on first use: 0.4 s that a study drawing
    nothing (a cached rerun) does not pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curve(
    curves: dict[str, list[tuple[int, float]]], best_step: int, title: str, path: Path
) -> Path:
    """Training loss and accuracy, source-validation accuracy, and the kept step, in one PNG."""
    plt = pyplot()
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, points in curves.items():
        if not points:
            continue
        steps, values = zip(*points)
        axis = loss_axis if name.endswith("loss") else acc_axis
        axis.plot(steps, values, label=name, marker="o" if name.startswith("val") else None, markersize=3)
    for axis, label in ((loss_axis, "loss"), (acc_axis, "accuracy")):
        axis.set_xlabel("meta-training step")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    acc_axis.axvline(best_step, color="grey", linestyle="--", linewidth=1)
    acc_axis.text(best_step, acc_axis.get_ylim()[0], " kept", color="grey", fontsize=8, va="bottom")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def accuracy_vs_shots(summary: pd.DataFrame, path: Path) -> Path:
    """One panel per target: accuracy against shots for each algorithm, with 95% CI bands."""
    plt = pyplot()
    targets = list(dict.fromkeys(summary.target))
    names = list(dict.fromkeys(summary.algorithm))
    colours = dict(zip(names, distinct_colours(len(names)), strict=True))
    band_alpha = 0.2 if len(names) <= 5 else 0.1  # many overlapping bands hide the lines
    figure, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), squeeze=False)
    for axis, target in zip(axes[0], targets):
        for algorithm, rows in summary[summary.target == target].groupby("algorithm", sort=False):
            rows = rows.sort_values("shots")
            colour = colours[algorithm]
            axis.plot(rows.shots, 100 * rows.acc, marker="o", label=algorithm, color=colour)
            low, high = 100 * (rows.acc - rows.ci95), 100 * (rows.acc + rows.ci95)
            axis.fill_between(rows.shots, low, high, alpha=band_alpha, color=colour)
        axis.set_title(f"target: {target}")
        axis.set_xlabel("shots")
        axis.set_xticks(sorted(summary.shots.unique()))
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside, not over, the lines
    figure.tight_layout()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def distinct_colours(count: int) -> list[tuple[float, float, float, float]]:
    """`count` colours, neighbours in different hues: tab10 up to 10; beyond, tab20's ten dark hues
    first, then their light partners (tab20 in order pairs each hue with its light shade)."""
    plt = pyplot()
    if count <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(count)]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return [plt.get_cmap("tab20")(order[i % 20]) for i in range(count)]


def accuracy_heatmap(summary: pd.DataFrame, path: Path) -> Path:
    """Algorithm x target domain accuracy, one panel per shot count."""
    plt = pyplot()
    shots = sorted(summary.shots.unique())
    algorithms = list(dict.fromkeys(summary.algorithm))
    targets = list(dict.fromkeys(summary.target))
    size = (1.6 + 1.3 * len(targets), 1.2 + 0.4 * len(algorithms))
    figure, axes = plt.subplots(1, len(shots), figsize=(size[0] * len(shots), size[1]), squeeze=False)
    for axis, k in zip(axes[0], shots):
        grid = summary[summary.shots == k].pivot(index="algorithm", columns="target", values="acc")
        grid = grid.loc[algorithms, targets] * 100
        image = axis.imshow(grid.values, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(targets)), targets)
        axis.set_yticks(range(len(algorithms)), algorithms)
        for (i, j), value in np.ndenumerate(grid.values):
            axis.text(j, i, f"{value:.1f}", ha="center", va="center", color="white", fontsize=8)
        axis.set_title(f"{k}-shot accuracy (%)")
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def critical_difference(friedman: Friedman, path: Path) -> Path:
    """Demsar's critical-difference diagram: mean ranks on one axis (1 = best, at the left), and a bar
    joining algorithms whose mean ranks differ by less than the Nemenyi critical difference."""
    plt = pyplot()
    names = sorted(friedman.mean_ranks, key=friedman.mean_ranks.get)
    ranks = [friedman.mean_ranks[name] for name in names]
    k = len(names)
    half = (k + 1) // 2
    figure, axis = plt.subplots(figsize=(7, 1.2 + 0.3 * half))
    axis.set_xlim(0.5, k + 0.5)
    axis.set_ylim(-(half + 1.5), 2)
    axis.axhline(0, color="black", linewidth=1)
    for tick in range(1, k + 1):
        axis.plot([tick, tick], [0, 0.15], color="black", linewidth=1)
        axis.text(tick, 0.3, str(tick), ha="center", fontsize=8)
    cd = friedman.critical_difference
    axis.plot([1, 1 + cd], [1.3, 1.3], color="black", linewidth=2)
    axis.text(1 + cd / 2, 1.45, f"CD = {cd:.2f}", ha="center", fontsize=8)
    for i, (name, rank) in enumerate(zip(names, ranks)):
        left = i < half
        level = -(i + 1) if left else -(k - i)
        end = 0.5 if left else k + 0.5
        axis.plot([rank, rank, end], [0, level, level], color="grey", linewidth=1)
        axis.text(end, level + 0.1, f"{name} ({rank:.2f})", ha="left" if left else "right", fontsize=8)
    groups = [(ranks[i], ranks[j]) for i in range(k) for j in range(i + 1, k) if ranks[j] - ranks[i] < cd]
    maximal = [g for g in groups if not any(o != g and o[0] <= g[0] and g[1] <= o[1] for o in groups)]
    for level, (low, high) in enumerate(dict.fromkeys(maximal)):
        y = -0.35 - 0.25 * level
        axis.plot([low - 0.05, high + 0.05], [y, y], color="black", linewidth=3)
    axis.set_title(f"mean rank over {friedman.cells} cells (Friedman p = {friedman.p_value:.3g})", fontsize=9)
    axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
