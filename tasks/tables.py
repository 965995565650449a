"""The accuracy table that the run's report and `adaptflow compare` both print.

One row per value of the first key, one column per combination of the others (for example
"dslr 1-shot"), cells "acc ± ci" in percent.
"""

from __future__ import annotations

import shutil

import pandas as pd


def column_names(frame: pd.DataFrame, keys: list[str]) -> list[str]:
    """Readable column labels: '5-shot' for shots, 'seed=1' for seeds, the value otherwise."""

    def name(row: pd.Series) -> str:
        return " ".join(
            f"{row[key]}-shot" if key == "shots" else f"{key}={row[key]}" if key == "seed" else str(row[key])
            for key in keys
        )

    return [name(row) for _, row in frame.iterrows()] if keys else ["acc"] * len(frame)


def accuracy_table(
    summary: pd.DataFrame,
    by: list[str],
    *,
    average_targets: bool = False,
    mark_best: str | None = None,
    plus_minus: str = "±",
) -> pd.DataFrame:
    """`summary` (with `acc` and `ci95` per group of `by`) as a wide table of text cells.

    Rows keep their order of first appearance; columns are sorted. With `average_targets`
    and "target" among the column keys, "avg" columns give the mean accuracy over targets,
    for rows that have every target only (else "–": a mean over fewer targets is not comparable).
    `mark_best` ("markdown" or "latex") sets the best cell of each column in bold; `plus_minus` is the
    sign between accuracy and interval ("$\\pm$" for LaTeX).
    """
    summary = summary.copy()
    rows_key, column_keys = by[0], by[1:]
    summary["column"] = column_names(summary, column_keys)
    rows = list(dict.fromkeys(summary[rows_key]))
    columns = list(dict.fromkeys(summary.sort_values(column_keys or [rows_key]).column))
    values = summary.pivot(index=rows_key, columns="column", values="acc").loc[rows, columns]
    intervals = summary.pivot(index=rows_key, columns="column", values="ci95").loc[rows, columns]
    if average_targets and "target" in column_keys:
        rest = [key for key in column_keys if key != "target"]
        grouped = summary.groupby([rows_key, *rest])
        counts = grouped.target.nunique()
        # every target of its column group (a source's targets leave the source out), not of the table
        expected = summary.groupby(rest).target.nunique().reindex(counts.index.droplevel(0)) if rest else None
        needed = summary.target.nunique() if expected is None else expected.to_numpy()
        averages = grouped.acc.mean().where(counts.to_numpy() == needed).reset_index()
        averages["column"] = ["avg " + name for name in column_names(averages, rest)] if rest else "avg"
        average_columns = list(dict.fromkeys(averages.sort_values(rest or [rows_key]).column))  # 5 before 20
        average_table = averages.pivot(index=rows_key, columns="column", values="acc")[average_columns]
        values = values.join(average_table)
        intervals = intervals.join(average_table * float("nan"))
    cells = pd.DataFrame(index=values.index, columns=values.columns, dtype=object)
    for column in values.columns:
        best = values[column].max()
        for row in values.index:
            value, interval = values.at[row, column], intervals.at[row, column]
            if pd.isna(value):
                cells.at[row, column] = "–"
                continue
            text = f"{100 * value:.1f}" + ("" if pd.isna(interval) else f" {plus_minus} {100 * interval:.1f}")
            if mark_best and value == best:
                text = f"\\textbf{{{text}}}" if mark_best == "latex" else f"**{text}**"
            cells.at[row, column] = text
    return cells.rename_axis(None).rename_axis(None, axis=1)


def to_markdown(frame: pd.DataFrame, index_label: str = "") -> str:
    """A markdown table; the index becomes the first column (headed `index_label`) unless it is a
    plain range."""
    index = not isinstance(frame.index, pd.RangeIndex)
    header = ([index_label] if index else []) + [str(column) for column in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in frame.iterrows():
        cells = ([str(label)] if index else []) + [str(value) for value in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def terminal_width() -> int:
    return max(shutil.get_terminal_size(fallback=(120, 24)).columns, 40)


def fit_to_terminal(frame: pd.DataFrame, index: bool = True) -> str:
    """The table as text no wider than the terminal: columns that do not fit go to further blocks,
    each repeating the row labels."""
    return frame.to_string(index=index, line_width=terminal_width())
