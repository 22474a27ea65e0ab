"""Shared plumbing of the training experiments: run a grid of (cell, setting, seed) units with resume, write
records.csv / records.json / summary.csv. The maths lives in rnnlab.train and rnnlab.tasks; the learning-curve figure
is `rnnlab.plots.learning_curves`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from rnnlab import results


def run_grid(out: Path, config: Mapping, units: Iterable[tuple], run_unit: Callable[..., Mapping]) -> dict:
    """Run every unit (a tuple of labels) not already saved in the run folder ``out``; return all records."""
    folder = results.RunFolder(out, config)
    units = list(units)
    for unit in results.progress(units):
        if folder.load(*unit) is None:
            folder.save(*unit, table=run_unit(*unit))
    tables = [folder.load(*unit) for unit in units]
    return {column: np.concatenate([table[column] for table in tables]) for column in tables[0]}


def summarize(table: Mapping[str, np.ndarray], keys: tuple[str, ...], *, success: Callable[[float], bool],
              metric: str = "test_loss") -> list:
    """One row per ``keys`` combination: final test loss (and accuracy, and ``metric``), success (``success`` of the
    final ``metric``), first step of success."""
    rows = []
    labels = sorted({tuple(table[k][i] for k in keys) for i in range(len(table["step"]))}, key=str)
    for label in labels:
        mask = np.all([table[k] == v for k, v in zip(keys, label)], axis=0)
        steps, test_loss, judged = table["step"][mask], table["test_loss"][mask], table[metric][mask]
        solved = [int(s) for s, value in zip(steps, judged) if success(value)]
        row = {**dict(zip(keys, (v.item() if hasattr(v, "item") else v for v in label))),
               "final_test_loss": float(test_loss[-1]), "best_test_loss": float(np.nanmin(test_loss))}
        for name in dict.fromkeys(("test_accuracy", metric)):
            if name in table and name != "test_loss":
                row[f"final_{name}"] = float(table[name][mask][-1])
        row.update({"solved": bool(success(judged[-1])), "first_solved_step": solved[0] if solved else -1,
                    "nonfinite_updates": int(np.sum(table["nonfinite"][mask]))})
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
