"""Gradient-flow sweeps over cells × gains × seeds × sequence lengths, as tidy records.

One compiled program per (cell, T): the parameters of every (gain, seed) configuration are made by one
``jit(vmap(init))`` and measured by one ``jit(vmap(grad_norms))``; with several devices the configuration axis is
sharded over all of them (`jax.sharding`). Initialisation is a program of its own: batched QR (orthogonal weights)
inside the same program as heavy work has hung JAX's CPU thread pool.

**The gain** multiplies every recurrent weight block: each leaf of the parameters named ``w_h…`` (all gates), or
whatever the cell's own ``scale_recurrent(params, gain)`` does if it defines one. With the default orthogonal
recurrent initialisation, gain ``g`` gives recurrent blocks ``g·Q``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rnnlab import gradflow, theory
from rnnlab import init as initializers
from rnnlab.cells import GRU, LSTM, RNN

#: Named cells of the default study; ``module:Class`` names a user's cell instead.
CELLS: dict[str, Callable[[int], object]] = {
    "rnn_tanh": lambda hidden_size: RNN(hidden_size, activation="tanh"),
    "rnn_relu": lambda hidden_size: RNN(hidden_size, activation="relu"),
    "irnn": lambda hidden_size: RNN(hidden_size, activation="relu", recurrent_init=initializers.identity()),
    "rnn_linear": lambda hidden_size: RNN(hidden_size, activation="linear"),
    "lstm": lambda hidden_size: LSTM(hidden_size),
    "gru": lambda hidden_size: GRU(hidden_size),
}

#: The columns of a gradient-flow record table, one row per (cell, gain, seed, seq_len, t).
COLUMNS = ("cell", "gain", "seed", "seq_len", "t", "lag", "log10_grad_norm", "finite", "theory_rate", "error")


def make_cell(spec, hidden_size: int):
    """A cell from a name in `CELLS`, a ``"module:Class"`` string (called as ``Class(hidden_size=...)``), or a cell."""
    if not isinstance(spec, str):
        return spec
    if spec in CELLS:
        return CELLS[spec](hidden_size)
    if ":" in spec:
        module_name, class_name = spec.split(":", 1)
        return getattr(importlib.import_module(module_name), class_name)(hidden_size=hidden_size)
    raise ValueError(f"cell {spec!r} is neither one of {sorted(CELLS)} nor 'module:Class'.")


def scale_recurrent(cell, params, gain):
    """``params`` with every recurrent weight block multiplied by ``gain`` (see the module docstring)."""
    if hasattr(cell, "scale_recurrent"):
        return cell.scale_recurrent(params, gain)

    def scale(path, leaf):
        name = getattr(path[-1], "key", getattr(path[-1], "name", "")) if path else ""
        return leaf * gain if str(name).startswith("w_h") else leaf

    return jax.tree_util.tree_map_with_path(scale, params)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The (gain, seed) configurations of one cell, flattened: configuration ``i`` is ``(gains[i], seeds[i])``."""

    gains: np.ndarray
    seeds: np.ndarray

    @classmethod
    def product(cls, gains: Sequence[float], seeds: Sequence[int]) -> "Grid":
        gain_grid, seed_grid = np.meshgrid(np.asarray(gains, np.float32), np.asarray(seeds, np.int64), indexing="ij")
        return cls(gain_grid.ravel(), seed_grid.ravel())

    def __len__(self) -> int:
        return len(self.gains)


def _config_sharding(n_configs: int):
    """A sharding of the leading (configuration) axis over all devices, and the padded configuration count."""
    devices = jax.devices()
    if len(devices) == 1:
        return None, n_configs
    mesh = Mesh(np.asarray(devices), ("config",))
    return NamedSharding(mesh, PartitionSpec("config")), math.ceil(n_configs / len(devices)) * len(devices)


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)]) if size > len(array) else array


def _inputs(seed, seq_len: int, batch: int, input_size: int, input_std: float):
    """The sweep's inputs for one seed, ``[T, batch, input_size]`` ~ N(0, input_std²): the same for every gain."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    return input_std * jax.random.normal(key, (seq_len, batch, input_size))


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What one (cell, T) program measured: ``log10_grad_norm [configs, T]`` and the theory rate ``[configs]``."""

    grid: Grid
    seq_len: int
    log10_grad_norm: np.ndarray
    theory_rate: np.ndarray


#: XLA's backend optimisation level for the programs that only draw random numbers and build parameters: level 1
#: compiles them in about a third of the time of the default, and they run as fast (measured on CPU: 3.4 s -> 1.25 s
#: of compilation for three cells' parameters, 0.14 s to run either way).
_LIGHT_COMPILE = {"xla_backend_optimization_level": 1}


def _distinct(seeds) -> tuple[jax.Array, jax.Array]:
    """``(distinct, which)`` with ``seeds == distinct[which]``: a grid's gains share each seed's parameters and
    inputs, so each distinct seed's are drawn once (6 times less random-number generation for 6 gains). Seeds
    traced inside a jit cannot be compared on the host: then every configuration draws its own."""
    if isinstance(seeds, jax.core.Tracer):
        return seeds, jnp.arange(seeds.shape[0])
    distinct, which = np.unique(np.asarray(seeds), return_inverse=True)
    return distinct, which.reshape(-1).astype(np.int32)


def init_configs(cell, seeds: jax.Array, gains: jax.Array, input_size: int):
    """Parameters for every configuration, ``cell.init(PRNGKey(seed), input_size)`` scaled by the gain, stacked
    on a leading axis: one compiled program per cell (and count of distinct seeds), which initialises each distinct
    seed once. Kept apart from `measure_configs` because batched QR (orthogonal weights) in one program with heavy
    work has hung JAX's CPU thread pool.

    The QRs run on one BLAS thread: OpenBLAS's worker threads (JAX's LAPACK on CPU) spin for a while after each
    call, and on a small machine they took a core from the measurement that follows (a sweep of 3 cells × 24
    configurations at T = 500 on 2 cores: 0.90 s with them, 0.75 s without)."""
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        return jax.block_until_ready(_init_distinct(cell, *_distinct(seeds), gains, input_size))


@functools.lru_cache(maxsize=1)
def _last_seed_inputs(distinct: tuple, seq_len: int, batch: int, input_size: int, input_std: float, replicated):
    """`_seed_inputs`, kept for the next call with the same arguments: a sweep over several cells at one T (as
    `bench_gradflow_sweep.py` and the experiments run) draws its inputs once, not once per cell (1M normals took
    13-17 ms each on the 2-core CPU, 2026-11-27, about 5 % of a cell's measurement at T = 500). One set is held."""
    return _seed_inputs(np.asarray(distinct), seq_len, batch, input_size, input_std, replicated)


@functools.partial(jax.jit, static_argnums=(0, 4), compiler_options=_LIGHT_COMPILE)
def _init_distinct(cell, distinct: jax.Array, which: jax.Array, gains: jax.Array, input_size: int):
    inits = jax.vmap(lambda seed: cell.init(jax.random.PRNGKey(seed), input_size))(distinct)
    return jax.vmap(lambda i, gain: scale_recurrent(cell, jax.tree_util.tree_map(lambda a: a[i], inits), gain))(
        which, gains)


def inputs_configs(seeds, seq_len: int, batch: int, input_size: int, input_std: float, *, sharding=None):
    """Every configuration's inputs ``[T, configs, batch, input_size]`` from its seed (``seeds``: host values, the
    same in every process), each distinct seed's drawn once: a program of its own, compiled once per shape and
    shared by every cell. Time-major, the layout the time loops read. ``sharding`` (of the configurations, as from
    `_config_sharding`) splits them over the devices of every process. (`grad_norm_table` does not copy them per
    configuration: its measurement reads each seed's inputs in place.)"""
    distinct, which = _distinct(seeds)
    if sharding is not None:
        which = _spread(which, sharding)
    return _inputs_gathered(distinct, which, seq_len, batch, input_size, input_std)


def _draw(distinct, seq_len: int, batch: int, input_size: int, input_std: float):
    return jax.vmap(lambda seed: _inputs(seed, seq_len, batch, input_size, input_std), out_axes=1)(distinct)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5), compiler_options=_LIGHT_COMPILE)
def _inputs_gathered(distinct: jax.Array, which: jax.Array, seq_len: int, batch: int, input_size: int,
                     input_std: float):
    return jnp.take(_draw(distinct, seq_len, batch, input_size, input_std), which, axis=1)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5), compiler_options=_LIGHT_COMPILE)
def _seed_inputs(distinct, seq_len: int, batch: int, input_size: int, input_std: float, replicated):
    """Each distinct seed's inputs ``[T, U, batch, input_size]``, on every device of ``replicated`` (a sharding,
    or None for the default device)."""
    inputs = _draw(distinct, seq_len, batch, input_size, input_std)
    return inputs if replicated is None else jax.lax.with_sharding_constraint(inputs, replicated)


@functools.partial(jax.jit, static_argnums=0)
def measure_configs(cell, params, xs: jax.Array, which: jax.Array | None = None):
    """``log10 ||∂L/∂h_t||`` ``[configs, T]`` for stacked parameters, configuration ``c`` on the inputs
    ``xs[:, which[c]]`` (``xs [T, U, batch, input_size]``; ``which`` None: ``U`` is the configurations, as from
    `inputs_configs`): one program per (cell, shapes), compiled once and reused for any gains and seeds of the same
    count (`gradflow.grad_norms_of_configs`).

    With several devices (the configurations a multiple of their count, as `grad_norm_table` pads them) each device
    measures its own configurations (`jax.shard_map`; every device holds the inputs). Left to XLA's partitioner, the
    native kernel would go through `custom_partitioning`, whose Python callback makes the program's
    persistent-cache key differ in every process: a warm cache would never hold it. Within a caller's `jax.set_mesh`
    of auto axes the sweep still uses its own mesh; within one of explicit axes it raises `ValueError`."""
    def measure(params, xs, which=None):
        which = jnp.arange(xs.shape[1], dtype=jnp.int32) if which is None else which
        return gradflow.grad_norms_of_configs(cell, params, xs, which)

    devices = jax.devices()
    if len(devices) == 1:
        return measure(params, xs, which)
    context = jax.sharding.get_abstract_mesh()
    if AxisType.Explicit in context.axis_types:
        raise ValueError(f"a sweep was run within jax.set_mesh of a mesh with explicit axes ({context}); it splits "
                         "its configurations over a mesh of its own, in JAX's default (auto) mode: run it outside "
                         "that context.")
    mesh = Mesh(np.asarray(devices), ("config",))
    configs = PartitionSpec("config")
    # shard_map wants JAX's abstract-mesh context to be its mesh: a caller's `jax.set_mesh` would clash with it.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        if which is None:  # the inputs split with the configurations
            return jax.shard_map(measure, mesh=mesh, in_specs=(configs, PartitionSpec(None, "config")),
                                 out_specs=configs, check_vma=False)(params, xs)
        return jax.shard_map(measure, mesh=mesh, in_specs=(configs, PartitionSpec(), configs), out_specs=configs,
                             check_vma=False)(params, xs, which)


def use_cpu_cores(count: int | None = None) -> None:
    """Show ``count`` CPU cores (all by default) to JAX as separate devices, so that sweeps shard their configuration
    axis over them and every core works: XLA's CPU backend runs a recurrence's small per-step matmuls on one thread.

    Call it before the first JAX computation of the process (JAX fixes its devices then; later it raises). On a
    machine with a GPU or TPU it only adds host devices; sweeps go on running on the accelerators.
    """
    jax.config.update("jax_num_cpu_devices", count or os.cpu_count() or 1)


def grad_norm_table(cell, grid: Grid, seq_len: int, *, input_size: int, batch: int, input_std: float = 1.0):
    """``(log10 ||∂L/∂h_t|| [configs, T], params, seeds)`` for every configuration of ``grid``, sharded over all
    devices when there are several, of every process after `jax.distributed.initialize` (``params`` and ``seeds``
    padded to a multiple of the device count, on this process's default device; the norms on every host).

    Parameters come from ``cell.init(PRNGKey(seed), input_size)`` scaled by the gain; inputs from the seed (the same
    for every gain).
    """
    sharding, padded = _config_sharding(len(grid))
    gains, seeds = _pad(grid.gains, padded), _pad(grid.seeds, padded)
    # Parameters are made on one device, then spread: batched QRs running on several host devices at once have
    # deadlocked XLA's CPU thread pool. Every process makes all of them (the same values), so the spread works
    # across hosts too.
    params = init_configs(cell, seeds, gains, input_size)
    spread_params = params if sharding is None else _spread(params, sharding)
    # Each distinct seed's inputs once, on every device; each configuration reads its seed's in place.
    distinct, which = _distinct(seeds)
    replicated = None if sharding is None else NamedSharding(sharding.mesh, PartitionSpec())
    xs = _last_seed_inputs(tuple(np.asarray(distinct).tolist()), seq_len, batch, input_size, input_std, replicated)
    which = jnp.asarray(which) if sharding is None else _spread(which, sharding)
    log10_norms = _gather(measure_configs(cell, spread_params, xs, which))
    return log10_norms[: len(grid)], params, seeds


def _spread(tree, sharding):
    """Each leaf (the same full value in every process) as a global array split by ``sharding`` — `jax.device_put`
    where every device is this process's, and each process filling in its own shards on several hosts."""
    def spread(leaf):
        leaf = np.asarray(leaf)
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

    return jax.tree_util.tree_map(spread, tree)


def _gather(array: jax.Array) -> np.ndarray:
    """The whole of a (possibly sharded) array on the host, from every process's shards after
    `jax.distributed.initialize`."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def measure(cell, grid: Grid, seq_len: int, *, input_size: int, batch: int, input_std: float = 1.0,
            theory_len: int = 500) -> Measurement:
    """`grad_norm_table` and the theory's rate for every configuration: a `Measurement`. ``theory_len`` steps of
    the same inputs feed the trajectory-dependent theory (gate paths)."""
    log10_norms, params, seeds = grad_norm_table(cell, grid, seq_len, input_size=input_size, batch=batch,
                                                 input_std=input_std)
    gains = _pad(grid.gains, len(seeds))
    theory_xs = jnp.moveaxis(inputs_configs(seeds, min(seq_len, theory_len), batch, input_size, input_std), 1, 0)
    theory_rate = theory.predicted_rates(cell, params, gains, theory_xs, input_std)[: len(grid)]
    return Measurement(grid, seq_len, log10_norms, theory_rate)


def records(cell_name: str, measurement: Measurement, *, max_points: int | None = None,
            error: str = "") -> dict[str, np.ndarray]:
    """Tidy columns (`COLUMNS`) for one measurement: a row per configuration and step ``t``.

    ``max_points`` keeps at most that many steps per curve, evenly spaced in ``t`` and always including the first
    and last step (long curves are straight lines on a log scale; the summary fits use every step).
    """
    n_configs, seq_len = measurement.log10_grad_norm.shape
    steps = np.arange(seq_len)
    if max_points is not None and seq_len > max_points:
        steps = np.unique(np.linspace(0, seq_len - 1, max_points).round().astype(int))
    values = measurement.log10_grad_norm[:, steps]
    return {
        "cell": np.full(values.size, cell_name),
        "gain": np.repeat(measurement.grid.gains, len(steps)),
        "seed": np.repeat(measurement.grid.seeds, len(steps)),
        "seq_len": np.full(values.size, seq_len),
        "t": np.tile(steps, n_configs),
        "lag": np.tile(seq_len - 1 - steps, n_configs),
        "log10_grad_norm": values.ravel(),
        "finite": np.isfinite(values).ravel(),
        "theory_rate": np.repeat(measurement.theory_rate, len(steps)),
        "error": np.full(values.size, error),
    }


def fit_rate(lags: np.ndarray, log10_grad_norm: np.ndarray) -> float:
    """Least-squares slope of ``log10 ||∂L/∂h_t||`` against the lag: the measured log10 rate per step.

    A gradient that became exactly zero (``-inf``, e.g. every ReLU unit switched off once) is fitted over the lags
    before it vanished; ``nan`` if any value is ``nan`` or ``+inf`` (the forward state overflowed) or fewer than two
    values are finite.
    """
    values = np.asarray(log10_grad_norm, float)
    if np.any(np.isnan(values) | (values == np.inf)):
        return float("nan")
    finite = np.isfinite(values)
    if finite.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.asarray(lags, float)[finite], values[finite], 1)[0])


def _segments(keys: np.ndarray):
    """Group the rows of ``keys [rows, k]``: ``(unique keys [groups, k], list of row indices per group)``."""
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    order = np.argsort(inverse, kind="stable")
    return unique, np.split(order, np.cumsum(np.bincount(inverse, minlength=len(unique)))[:-1])


def summarize(table: Mapping[str, np.ndarray]) -> list[dict]:
    """One row per (cell, T, gain): the fitted rate per step (mean and standard deviation over the seeds where it is
    finite), the theory's rate, the steps until the gradient falls by 10^6 at the measured rate (``inf`` if it does
    not fall), and how many seeds overflowed (``overflow_seeds``: nan or inf, no rate) or saw the gradient become
    exactly zero (``zero_seeds``: rate fitted before it vanished)."""
    cell_names, cell_codes = np.unique(np.asarray(table["cell"]), return_inverse=True)
    numeric = [np.asarray(table[key], np.float64) for key in ("seq_len", "gain", "seed")]
    configs, rows_of_config = _segments(np.stack([cell_codes.ravel().astype(np.float64), *numeric], axis=1))
    lag, value, theory_rate = (np.asarray(table[key]) for key in ("lag", "log10_grad_norm", "theory_rate"))
    rates = np.asarray([fit_rate(lag[rows], value[rows]) for rows in rows_of_config])
    vanished = np.asarray([np.any(value[rows] == -np.inf) for rows in rows_of_config])
    theory_rates = np.asarray([theory_rate[rows[0]] for rows in rows_of_config], np.float64)
    groups, configs_of_group = _segments(configs[:, :3])
    summary = []
    for (cell_code, seq_len, gain), members in zip(groups, configs_of_group):
        finite_rates = rates[members][np.isfinite(rates[members])]
        rate = float(finite_rates.mean()) if finite_rates.size else float("nan")
        theory = theory_rates[members]
        summary.append({
            "cell": str(cell_names[int(cell_code)]), "seq_len": int(seq_len), "gain": float(gain),
            "rate_mean": rate, "rate_std": float(finite_rates.std()) if finite_rates.size else float("nan"),
            "theory_rate": float(np.nanmean(theory)) if np.any(np.isfinite(theory)) else float("nan"),
            "steps_to_1e-6": 6.0 / -rate if rate < 0 else (float("inf") if rate >= 0 else float("nan")),
            "overflow_seeds": int(len(members) - finite_rates.size),
            "zero_seeds": int(np.sum(vanished[members])),
        })
    return summary


def headline(summary: Sequence[Mapping]) -> list[dict]:
    """For each (cell, gain), the summary row at the longest T whose rate is finite (or the longest T if none is):
    where an exploding forward state overflowed at long T, the longest horizon that still measured it."""
    best: dict[tuple, Mapping] = {}
    for row in summary:
        key = (row["cell"], row["gain"])
        current = best.get(key)
        rank = (np.isfinite(row["rate_mean"]), row["seq_len"])
        if current is None or rank > (np.isfinite(current["rate_mean"]), current["seq_len"]):
            best[key] = row
    return [dict(row) for row in best.values()]


def concat(tables: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate record tables column by column."""
    tables = list(tables)
    return {column: np.concatenate([np.asarray(table[column]) for table in tables]) for column in COLUMNS}


def gradient_flow(cells, gains: Sequence[float], seeds, seq_lens: Sequence[int], *, hidden_size: int,
                  input_size: int, batch: int, input_std: float = 1.0, max_points: int | None = None,
                  run=None, progress: Callable | None = None) -> dict[str, np.ndarray]:
    """Measure ``log10 ||∂L/∂h_t||`` over cells × gains × seeds × sequence lengths; return tidy records.

    **Arguments:** ``cells``: names (`CELLS` or ``"module:Class"``), cell objects, or a mapping name → cell;
    ``gains``; ``seeds``: a count or a sequence of integer seeds; ``seq_lens``; ``hidden_size`` (for named cells),
    ``input_size``, ``batch``; ``input_std``: inputs are ``N(0, input_std²)``; ``max_points``: see `records`;
    ``run``: a `rnnlab.results.RunFolder`; each (cell, T) unit is saved there when done and skipped when found, so
    an interrupted sweep resumes without losing or duplicating rows (after `jax.distributed.initialize`, process 0
    saves and every process reads: the folder must be one they all see); ``progress``: wraps the iterable of units
    (e.g. `rnnlab.results.progress`).

    **Returns:** columns `COLUMNS`, one row per (cell, gain, seed, T, t). A (cell, T) whose program fails (a user's
    cell raising, say) is recorded as rows with ``finite=False`` and the error message, and the sweep goes on.
    """
    named = cells.items() if isinstance(cells, Mapping) else [
        (spec if isinstance(spec, str) else type(spec).__name__.lower(), spec) for spec in cells
    ]
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    grid = Grid.product(gains, seeds)
    units = [(name, spec, seq_len) for name, spec in named for seq_len in seq_lens]
    tables = []
    for cell_name, spec, seq_len in (progress or iter)(units):
        table = run.load(cell_name, seq_len) if run is not None else None
        if table is None:
            table = _measure_unit(cell_name, make_cell(spec, hidden_size), grid, seq_len, input_size=input_size,
                                  batch=batch, input_std=input_std, max_points=max_points)
            if run is not None and jax.process_index() == 0:  # on several hosts, one writes (a shared folder)
                run.save(cell_name, seq_len, table=table)
        tables.append(table)
    return concat(tables)


def _measure_unit(cell_name, cell, grid, seq_len, *, max_points, **kwargs):
    try:
        return records(cell_name, measure(cell, grid, seq_len, **kwargs), max_points=max_points)
    except Exception as failure:  # noqa: BLE001 — a failing configuration is recorded and the sweep goes on
        nan = np.full((len(grid), seq_len), np.nan)
        failed = Measurement(grid, seq_len, nan, np.full(len(grid), np.nan))
        return records(cell_name, failed, max_points=max_points, error=f"{type(failure).__name__}: {failure}")


def format_summary(summary: Sequence[Mapping]) -> str:
    """The `headline` rows as a text table: cell, gain, T, fitted rate per step (mean ± std over seeds), theory,
    steps until the gradient falls by 10^6, and notes on seeds that overflowed or vanished exactly."""
    lines = [f"{'cell':<12} {'gain':>5} {'T':>6} {'rate/step (log10)':>20} {'theory':>8} {'steps to 1e-6':>14}"]
    for row in headline(summary):
        steps = row["steps_to_1e-6"]
        notes = [f"{row['overflow_seeds']} seeds overflowed"] if row["overflow_seeds"] else []
        notes += [f"exactly 0 in {row['zero_seeds']} seeds"] if row["zero_seeds"] else []
        lines.append(
            f"{row['cell']:<12} {row['gain']:>5g} {row['seq_len']:>6} "
            f"{row['rate_mean']:>+10.4f} ± {row['rate_std']:<7.4f} {row['theory_rate']:>+8.4f} "
            f"{'never' if steps == float('inf') else 'n/a' if steps != steps else f'{steps:.0f}':>14}"
            + (f"  ({'; '.join(notes)})" if notes else "")
        )
    return "\n".join(lines)
