"""Figures of a gradient-flow study, drawn from its tidy records (`rnnlab.sweep`) and summary rows.

Each function takes the record columns (or summary rows) and a path, and writes one PNG. Curves are means over
seeds; non-finite values (exact zeros, overflow) leave gaps rather than being hidden.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _cells(table) -> list[str]:
    names = np.asarray(table["cell"])
    _, first = np.unique(names, return_index=True)
    return [str(names[i]) for i in sorted(first)]


def _curves(table, cell: str, seq_len: int):
    """``(gains, lags, mean log10 norm [gains, lags])`` of one cell at one T, averaged over seeds."""
    rows = (np.asarray(table["cell"]) == cell) & (np.asarray(table["seq_len"]) == seq_len)
    gains = np.unique(np.asarray(table["gain"])[rows])
    lags = np.unique(np.asarray(table["lag"])[rows])
    means = np.full((len(gains), len(lags)), np.nan)
    for i, gain in enumerate(gains):
        chosen = rows & (np.asarray(table["gain"]) == gain)
        lag, value = np.asarray(table["lag"])[chosen], np.asarray(table["log10_grad_norm"])[chosen]
        with np.errstate(invalid="ignore"):
            sums = np.bincount(np.searchsorted(lags, lag), weights=value, minlength=len(lags))
        means[i] = sums / np.bincount(np.searchsorted(lags, lag), minlength=len(lags))
    return gains, lags, np.where(np.isfinite(means), means, np.nan)


def _panels(count: int, title: str):
    columns = min(count, 4)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    figure.suptitle(title)
    for axis in axes.ravel()[count:]:
        axis.set_visible(False)
    return figure, axes.ravel()


def _save(figure, path) -> None:
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def grad_vs_lag(table: Mapping[str, np.ndarray], path, *, seq_len: int | None = None) -> None:
    """``log10 ||∂L/∂h_t||`` against the lag ``T-1-t``: a panel per cell, a line per gain (at the longest T)."""
    seq_len = int(np.max(table["seq_len"])) if seq_len is None else seq_len
    cells = _cells(table)
    figure, axes = _panels(len(cells), f"Gradient norm against lag (T = {seq_len}, mean over seeds)")
    for axis, cell in zip(axes, cells):
        gains, lags, means = _curves(table, cell, seq_len)
        colours = plt.cm.coolwarm(np.linspace(0, 1, len(gains)))
        for gain, curve, colour in zip(gains, means, colours):
            axis.plot(lags, curve, color=colour, label=f"gain {gain:g}")
        axis.set(title=cell, xlabel="lag T-1-t (steps)", ylabel="log10 ||dL/dh_t||")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(figure, path)


def heatmap(table: Mapping[str, np.ndarray], path, *, seq_len: int | None = None) -> None:
    """Gain × lag heat map of ``log10 ||∂L/∂h_t||`` per cell (at the longest T)."""
    seq_len = int(np.max(table["seq_len"])) if seq_len is None else seq_len
    cells = _cells(table)
    figure, axes = _panels(len(cells), f"log10 ||dL/dh_t|| over gain and lag (T = {seq_len})")
    for axis, cell in zip(axes, cells):
        gains, lags, means = _curves(table, cell, seq_len)
        image = axis.imshow(means, aspect="auto", origin="lower", cmap="viridis",
                            extent=(lags.min(), lags.max(), -0.5, len(gains) - 0.5), interpolation="nearest")
        axis.set_yticks(range(len(gains)), [f"{gain:g}" for gain in gains])
        axis.set(title=cell, xlabel="lag T-1-t (steps)", ylabel="gain")
        figure.colorbar(image, ax=axis)
    _save(figure, path)


def rates_vs_gain(rows: Sequence[Mapping], path) -> None:
    """Fitted log10 rate per step against gain, measured (mean ± std over seeds) beside theory, a panel per cell.

    ``rows``: summary rows, one per (cell, gain) — e.g. `rnnlab.sweep.headline`; each point is labelled by its T
    when the cell's points come from different sequence lengths."""
    cells = list(dict.fromkeys(row["cell"] for row in rows))
    figure, axes = _panels(len(cells), "Gradient decay rate per step: measured vs theory")
    for axis, cell in zip(axes, cells):
        cell_rows = sorted((row for row in rows if row["cell"] == cell), key=lambda row: row["gain"])
        gains = [row["gain"] for row in cell_rows]
        seq_lens = sorted({row["seq_len"] for row in cell_rows})
        axis.errorbar(gains, [row["rate_mean"] for row in cell_rows], yerr=[row["rate_std"] for row in cell_rows],
                      marker="o", capsize=3, label=f"measured (T = {'/'.join(map(str, seq_lens))})")
        if len(seq_lens) > 1:
            for row in cell_rows:
                if np.isfinite(row["rate_mean"]):
                    axis.annotate(f"T={row['seq_len']}", (row["gain"], row["rate_mean"]), fontsize=6)
        theory = np.asarray([row["theory_rate"] for row in cell_rows], float)
        if np.any(np.isfinite(theory)):
            axis.plot(gains, theory, "k--", marker="x", label="theory")
        axis.axhline(0.0, color="grey", lw=0.8)
        axis.set(title=cell, xlabel="gain", ylabel="log10 rate per step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    _save(figure, path)


def first_step_vs_seq_len(table: Mapping[str, np.ndarray], path) -> None:
    """``log10 ||∂L/∂h_0||`` against the sequence length T, a panel per cell, a line per gain (mean over seeds)."""
    cells = _cells(table)
    figure, axes = _panels(len(cells), "Gradient reaching the first step against sequence length")
    first = np.asarray(table["t"]) == 0
    for axis, cell in zip(axes, cells):
        rows = first & (np.asarray(table["cell"]) == cell)
        gains = np.unique(np.asarray(table["gain"])[rows])
        colours = plt.cm.coolwarm(np.linspace(0, 1, len(gains)))
        for gain, colour in zip(gains, colours):
            chosen = rows & (np.asarray(table["gain"]) == gain)
            seq_lens = np.unique(np.asarray(table["seq_len"])[chosen])
            values = [np.mean(np.asarray(table["log10_grad_norm"])[chosen & (np.asarray(table["seq_len"]) == n)])
                      for n in seq_lens]
            axis.plot(seq_lens, np.where(np.isfinite(values), values, np.nan), marker="o", color=colour,
                      label=f"gain {gain:g}")
        axis.set_xscale("log")
        axis.set(title=cell, xlabel="sequence length T", ylabel="log10 ||dL/dh_0||")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(figure, path)


def learning_curves(table: Mapping[str, np.ndarray], path, *, panel: str, line: str, metric: str = "test_loss",
                    baseline=None, log: bool = True) -> None:
    """Training records (`rnnlab.train.curve_records`) as learning curves: a panel per value of ``panel``, a line
    per (``line``, seed), ``metric`` against step. ``baseline``: ``panel value -> float``, drawn dashed."""
    panels = sorted(set(np.asarray(table[panel]).tolist()), key=str)
    figure, axes = _panels(len(panels), f"{metric} during training")
    lines = sorted(set(np.asarray(table[line]).tolist()), key=str)
    colours = dict(zip(lines, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    seeds = sorted(set(np.asarray(table["seed"]).tolist()))
    for axis, value in zip(axes, panels):
        for name in lines:
            for seed in seeds:
                rows = ((np.asarray(table[panel]) == value) & (np.asarray(table[line]) == name)
                        & (np.asarray(table["seed"]) == seed))
                if rows.any():
                    axis.plot(np.asarray(table["step"])[rows], np.asarray(table[metric])[rows], color=colours[name],
                              label=str(name) if seed == seeds[0] else None, alpha=0.85)
        if baseline is not None:
            axis.axhline(baseline(value), color="grey", linestyle="--", linewidth=1, label="baseline")
        axis.set(title=f"{panel} = {value}", xlabel="step", ylabel=metric)
        if log:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    _save(figure, path)


def forecasts(times, actual, predicted: Mapping, path, *, first: int = 1) -> None:
    """One-step-ahead forecasts against the actual series, from index ``first ≥ 1`` on: ``times [N]``, ``actual [N]``,
    ``predicted``: ``{(name, seed): [N]}`` (a colour per name), and persistence (the previous actual value)."""
    times, actual = np.asarray(times), np.asarray(actual)
    figure, axes = _panels(1, "One-step-ahead forecasts on held-out data")
    figure.set_size_inches(9, 3.6)
    axes[0].plot(times[first:], actual[first:], color="black", lw=2, label="actual")
    axes[0].plot(times[first:], actual[first - 1:-1], color="grey", ls="--", label="persistence")
    names = list(dict.fromkeys(name for name, _ in predicted))
    colours = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    labelled = set()
    for (name, _), values in predicted.items():
        axes[0].plot(times[first:], np.asarray(values)[first:], color=colours[name], alpha=0.6,
                     label=None if name in labelled else str(name))
        labelled.add(name)
    axes[0].set(xlabel="time", ylabel="value")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(figure, path)


def grad_norms_during_training(table: Mapping[str, np.ndarray], path) -> None:
    """``log10 ||∂L/∂h_t||`` against the step ``t``, a panel per cell, a line per training step at which it was
    measured (0: initialisation; mean over seeds), from columns ``cell, seed, step, t, log10_grad_norm``."""
    cells = _cells(table)
    seq_len = int(np.max(table["t"])) + 1
    figure, axes = _panels(len(cells), f"Gradient of the loss reaching each step, during training (T = {seq_len})")
    steps = np.unique(np.asarray(table["step"]))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(steps)))
    for axis, cell in zip(axes, cells):
        for step, colour in zip(steps, colours):
            rows = (np.asarray(table["cell"]) == cell) & (np.asarray(table["step"]) == step)
            t, values = np.asarray(table["t"])[rows], np.asarray(table["log10_grad_norm"])[rows]
            means = np.bincount(t, weights=values, minlength=seq_len) / np.maximum(np.bincount(t, minlength=seq_len), 1)
            axis.plot(np.arange(seq_len), np.where(np.isfinite(means), means, np.nan), color=colour,
                      label="initialisation" if step == 0 else f"step {step}")
        axis.set(title=cell, xlabel="time step t", ylabel="log10 ||dL/dh_t||")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    _save(figure, path)
