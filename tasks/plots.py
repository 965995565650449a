"""Figures people would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def learning_curve(
    curves: dict[str, list[tuple[int, float]]], best_step: int, title: str, path: Path
) -> Path:
    """Training loss and accuracy, source-validation accuracy, and the kept step, in one PNG."""
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
