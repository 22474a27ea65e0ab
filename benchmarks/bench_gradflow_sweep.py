"""Gradient-flow sweep: rnnlab against the same sweep written as a PyTorch user would.

3 cells (tanh RNN, LSTM, GRU) × 6 gains × 4 seeds, batch 16, input 32, hidden 128, T = 500: log ||∂L/∂h_t|| for
every t, L = Σ h_T² / batch. PyTorch: a loop over the 72 configurations, a Python loop over steps with
``retain_grad`` on every h_t, one backward each (torch.set_num_threads(2)). rnnlab: `rnnlab.sweep` — one
``jit(vmap)`` program per cell over its 24 configurations, in the log domain.

Also printed: the arithmetic limit, i.e. the multiply-adds the sweep cannot avoid (recurrent matmuls forward and
backward, input projections) divided by the throughput of the sweep's own batched matmul shape measured in this run.

    python benchmarks/bench_gradflow_sweep.py            # the issue's sizes
    RNNLAB_BENCH_QUICK=1 python benchmarks/bench_gradflow_sweep.py   # tiny sizes: checks the code runs
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rnnlab import sweep

QUICK = bool(os.environ.get("RNNLAB_BENCH_QUICK"))
CELLS = ("rnn_tanh", "lstm", "gru")
GATES = {"rnn_tanh": 1, "lstm": 4, "gru": 3}
GAINS = (0.5, 0.8, 1.0, 1.2, 1.5, 2.0)
SEEDS = 2 if QUICK else 4
BATCH, INPUT, HIDDEN, SEQ_LEN = (4, 8, 16, 20) if QUICK else (16, 32, 128, 500)
REPEATS = 1 if QUICK else 3


def torch_sweep():
    """The sweep as a PyTorch user writes it; returns (seconds, log10 norms [configs, T])."""
    import torch

    torch.set_num_threads(2)
    modules = {"rnn_tanh": torch.nn.RNNCell, "lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}
    start, all_norms = time.perf_counter(), []
    for name in CELLS:
        for gain in GAINS:
            for seed in range(SEEDS):
                torch.manual_seed(seed)
                cell = modules[name](INPUT, HIDDEN)
                with torch.no_grad():
                    for block in cell.weight_hh.chunk(GATES[name], 0):
                        torch.nn.init.orthogonal_(block)
                        block.mul_(gain)
                xs = torch.randn(SEQ_LEN, BATCH, INPUT)
                h = torch.zeros(BATCH, HIDDEN)
                state = (h, torch.zeros(BATCH, HIDDEN)) if name == "lstm" else h
                hs = []
                for x in xs:
                    state = cell(x, state)
                    h = state[0] if name == "lstm" else state
                    h.retain_grad()
                    hs.append(h)
                ((hs[-1] ** 2).sum() / BATCH).backward()
                with np.errstate(divide="ignore"):  # float32 underflow to 0 is what this comparison counts
                    all_norms.append(np.log10([h.grad.norm().item() for h in hs]))
    return time.perf_counter() - start, np.asarray(all_norms)


def rnnlab_sweep():
    """One pass over the three cells' programs; returns (seconds, log10 norms [configs, T])."""
    grid = sweep.Grid.product(GAINS, range(SEEDS))
    start, all_norms = time.perf_counter(), []
    for name in CELLS:
        cell = sweep.make_cell(name, HIDDEN)
        params = sweep.init_configs(cell, jnp.asarray(grid.seeds), jnp.asarray(grid.gains), INPUT)
        norms = sweep.measure_configs(cell, params, jnp.asarray(grid.seeds), SEQ_LEN, BATCH, INPUT, 1.0)
        all_norms.append(np.asarray(norms))
    return time.perf_counter() - start, np.concatenate(all_norms)


def matmul_throughput() -> float:
    """GFLOP/s of the sweep's batched per-step matmul, [24, 16, 128] @ [24, 128, 512], in this process."""
    configs = len(GAINS) * SEEDS
    a = jax.random.normal(jax.random.PRNGKey(0), (configs, BATCH, HIDDEN))
    b = jax.random.normal(jax.random.PRNGKey(1), (configs, HIDDEN, 4 * HIDDEN))
    # Each product feeds the next, as in a recurrence, so XLA cannot hoist it out of the loop.
    chained = jax.jit(lambda a, b: jax.lax.fori_loop(0, 200, lambda i, x: (x @ b)[:, :, :HIDDEN] * 0.05, a))
    chained(a, b).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        chained(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 200 * 2 * configs * BATCH * HIDDEN * 4 * HIDDEN / statistics.median(times) / 1e9


def unavoidable_flops() -> float:
    """Multiply-adds × 2 the sweep cannot avoid: per step and configuration, the recurrent matmul forward and its
    transpose backward, and the input projection."""
    per_step = sum(BATCH * (2 * HIDDEN + INPUT) * GATES[name] * HIDDEN for name in CELLS)
    return 2.0 * per_step * len(GAINS) * SEEDS * SEQ_LEN


def main():
    jax.config.update("jax_compilation_cache_dir", "")  # cold compile: what a first run costs
    first_seconds, ours = rnnlab_sweep()
    steady = statistics.median(rnnlab_sweep()[0] for _ in range(REPEATS))
    torch_seconds, theirs = torch_sweep()
    throughput = matmul_throughput()
    limit = unavoidable_flops() / (throughput * 1e9)
    # The two sweeps draw different random weights; their values agree where both are finite (tests/test_gradflow.py
    # checks that with the same weights). What differs is where float32 gives up: 0 (log -inf) or inf.
    finite_ours, finite_theirs = np.isfinite(ours).mean(), np.isfinite(theirs).mean()
    print(f"gradient-flow sweep: {len(CELLS)} cells × {len(GAINS)} gains × {SEEDS} seeds, batch {BATCH}, "
          f"input {INPUT}, hidden {HIDDEN}, T = {SEQ_LEN}; 2-core CPU")
    print(f"{'row':<44} {'value':>12}")
    rows = [
        ("pytorch loop (retain_grad), s", f"{torch_seconds:.2f}"),
        ("rnnlab steady state, s", f"{steady:.2f}"),
        ("rnnlab first call (trace + compile + run), s", f"{first_seconds:.2f}"),
        ("rnnlab compile time (first - steady), s", f"{first_seconds - steady:.2f}"),
        ("speed-up steady vs pytorch (target >= 3)", f"{torch_seconds / steady:.2f}"),
        ("matmul throughput at the sweep's shape, GFLOP/s", f"{throughput:.0f}"),
        ("arithmetic limit, s", f"{limit:.3f}"),
        ("rnnlab steady / arithmetic limit", f"{steady / limit:.2f}"),
        ("fraction of t finite and non-zero: rnnlab", f"{finite_ours:.3f}"),
        ("fraction of t finite and non-zero: pytorch float32", f"{finite_theirs:.3f}"),
    ]
    for name, value in rows:
        print(f"{name:<44} {value:>12}")
    holds = torch_seconds / steady >= 3
    print(f"TARGET steady-state >= 3x faster than the pytorch loop: {'holds' if holds else 'does not hold'} "
          f"({torch_seconds / steady:.2f}x)")


if __name__ == "__main__":
    main()
