"""Shared plumbing of the training experiments: run a grid of (cell, setting, seed) units with resume, write
records.csv / records.json / summary.csv, draw learning curves. The maths lives in rnnlab.train and rnnlab.tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rnnlab import results  # noqa: E402


def run_grid(out: Path, config: Mapping, units: Iterable[tuple], run_unit: Callable[..., Mapping]) -> dict:
    """Run every unit (a tuple of labels) not already saved in the run folder ``out``; return all records."""
    folder = results.RunFolder(out, config)
    units = list(units)
    for unit in results.progress(units):
        if folder.load(*unit) is None:
            folder.save(*unit, table=run_unit(*unit))
    tables = [folder.load(*unit) for unit in units]
    return {column: np.concatenate([table[column] for table in tables]) for column in tables[0]}


def summarize(table: Mapping[str, np.ndarray], keys: tuple[str, ...], *, success: Callable[[float], bool]) -> list:
    """One row per ``keys`` combination: final test loss (and accuracy), success, first step of success."""
    rows = []
    labels = sorted({tuple(table[k][i] for k in keys) for i in range(len(table["step"]))}, key=str)
    for label in labels:
        mask = np.all([table[k] == v for k, v in zip(keys, label)], axis=0)
        steps, test_loss = table["step"][mask], table["test_loss"][mask]
        solved = [int(s) for s, loss in zip(steps, test_loss) if success(loss)]
        row = {**dict(zip(keys, (v.item() if hasattr(v, "item") else v for v in label))),
               "final_test_loss": float(test_loss[-1]), "best_test_loss": float(np.nanmin(test_loss)),
               "solved": bool(success(test_loss[-1])), "first_solved_step": solved[0] if solved else -1,
               "nonfinite_updates": int(np.sum(table["nonfinite"][mask]))}
        if "test_accuracy" in table:
            row["final_test_accuracy"] = float(table["test_accuracy"][mask][-1])
        rows.append(row)
    return rows


def format_rows(rows: list) -> str:
    columns = list(rows[0])
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    for row in rows:
        lines.append(" | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    return "\n".join(lines)


def write_outputs(out: Path, config: Mapping, table: Mapping, summary: list) -> None:
    results.write_csv(out / "records.csv", table)
    results.write_csv(out / "summary.csv", {key: [row[key] for row in summary] for key in summary[0]})
    results.write_json(out / "records.json", {**results.provenance(), "config": dict(config), "summary": summary})


def learning_curves(table: Mapping[str, np.ndarray], path: Path, *, panel: str, line: str, metric: str = "test_loss",
                    baseline: Callable[[object], float] | None = None, log: bool = True) -> None:
    """One panel per value of ``panel``; one line per (``line``, seed); ``metric`` against step."""
    panels = sorted(set(table[panel].tolist()), key=str)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    lines = sorted(set(table[line].tolist()), key=str)
    colours = dict(zip(lines, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for ax, value in zip(axes[0], panels):
        for name in lines:
            for seed in sorted(set(table["seed"].tolist())):
                mask = (table[panel] == value) & (table[line] == name) & (table["seed"] == seed)
                if mask.any():
                    ax.plot(table["step"][mask], table[metric][mask], color=colours[name],
                            label=str(name) if seed == min(table["seed"]) else None, alpha=0.85)
        if baseline is not None:
            ax.axhline(baseline(value), color="grey", linestyle="--", linewidth=1, label="baseline")
        ax.set_title(f"{panel} = {value}")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
