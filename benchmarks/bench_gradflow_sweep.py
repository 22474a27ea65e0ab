"""Gradient-flow sweep: rnnlab against the same sweep written as a PyTorch user would.

3 cells (tanh RNN, LSTM, GRU) × 6 gains × 4 seeds, batch 16, input 32, hidden 128, T = 500: log ||∂L/∂h_t|| for
every t, L = Σ h_T² / batch. rnnlab shows each core to JAX as a device (`sweep.use_cpu_cores`, as the experiment
does), so the configurations are sharded over both cores. PyTorch: a loop over the 72 configurations, a Python
loop over steps with ``retain_grad`` on every h_t, one backward each (torch.set_num_threads(2); on CUDA where torch
sees a GPU). rnnlab: `rnnlab.sweep` — one ``jit(vmap)`` program per cell over its 24 configurations, in the log
domain.

Also printed: the arithmetic limit, i.e. the multiply-adds the sweep cannot avoid (recurrent matmuls forward and
backward, input projections) divided by the throughput of the sweep's own batched matmul shape measured in this run.

    python benchmarks/bench_gradflow_sweep.py            # the issue's sizes
    RNNLAB_BENCH_QUICK=1 python benchmarks/bench_gradflow_sweep.py   # tiny sizes: checks the code runs

Scaling: the steady state again in a fresh process that shows JAX a single CPU device, against the sharded one.
On a GPU, also the steady state in a fresh process whose gradient-flow loops run 8 steps per iteration
(``RNNLAB_GPU_FLOW_UNROLL=8``) against rnnlab's default there, 1 (8 is faster once compiled and compiles seconds
longer; benchmarks/README.md).

End to end: a fresh process importing rnnlab and running the sweep once, with an empty persistent compilation cache
(cold) and again with the cache it filled (warm), against the PyTorch loop's time.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rnnlab import sweep

HEADER = ("name", "ours", "peer", "ratio", "target", "holds")
QUICK = bool(os.environ.get("RNNLAB_BENCH_QUICK"))
CELLS = ("rnn_tanh", "lstm", "gru")
GATES = {"rnn_tanh": 1, "lstm": 4, "gru": 3}
GAINS = (0.5, 0.8, 1.0, 1.2, 1.5, 2.0)
SEEDS = 2 if QUICK else 4
BATCH, INPUT, HIDDEN, SEQ_LEN = (4, 8, 16, 20) if QUICK else (16, 32, 128, 500)
REPEATS = 1 if QUICK else 3
FLOW_UNROLL = {"RNNLAB_GPU_FLOW_UNROLL": "8"}


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_sweep():
    """The sweep as a PyTorch user writes it; returns (seconds, log10 norms [configs, T])."""
    import torch

    torch.set_num_threads(2)
    device = _torch_device()
    modules = {"rnn_tanh": torch.nn.RNNCell, "lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}
    start, all_norms = time.perf_counter(), []
    for name in CELLS:
        for gain in GAINS:
            for seed in range(SEEDS):
                torch.manual_seed(seed)
                cell = modules[name](INPUT, HIDDEN, device=device)
                with torch.no_grad():
                    for block in cell.weight_hh.chunk(GATES[name], 0):
                        torch.nn.init.orthogonal_(block)
                        block.mul_(gain)
                xs = torch.randn(SEQ_LEN, BATCH, INPUT, device=device)
                h = torch.zeros(BATCH, HIDDEN, device=device)
                state = (h, torch.zeros(BATCH, HIDDEN, device=device)) if name == "lstm" else h
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
        norms, _, _ = sweep.grad_norm_table(sweep.make_cell(name, HIDDEN), grid, SEQ_LEN, input_size=INPUT,
                                            batch=BATCH)
        all_norms.append(norms)
    return time.perf_counter() - start, np.concatenate(all_norms)


def matmul_throughput() -> float:
    """GFLOP/s of the sweep's batched per-step matmul, [24, 16, 128] @ [24, 128, 512], in this process, with the
    configuration axis sharded over the devices as the sweep shards it."""
    configs = len(GAINS) * SEEDS
    a = jax.random.normal(jax.random.PRNGKey(0), (configs, BATCH, HIDDEN))
    b = jax.random.normal(jax.random.PRNGKey(1), (configs, HIDDEN, 4 * HIDDEN))
    if len(jax.devices()) > 1 and configs % len(jax.devices()) == 0:
        sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("config",)), PartitionSpec("config"))
        a, b = jax.device_put(a, sharding), jax.device_put(b, sharding)
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


def end_to_end(cache_dir: str) -> float:
    """Wall time of a fresh process that imports rnnlab and runs the sweep once, with ``cache_dir`` as JAX's
    persistent compilation cache (empty: a cold start; filled by an earlier run: a warm one)."""
    command = [sys.executable, __file__, "--once"]
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir,
                                             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    return time.perf_counter() - start


def steady_in_fresh_process(one_device: bool = False, env: dict | None = None) -> float:
    """Steady-state seconds of the sweep in a fresh process with ``env`` added to the environment; ``one_device``:
    JAX shown one CPU device (no sharding), for the scaling row."""
    command = [sys.executable, __file__, "--steady", *(["--one-device"] if one_device else [])]
    output = subprocess.run(command, check=True, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}).stdout
    return float(output.split("STEADY")[-1])


def steady_seconds() -> float:
    """Median seconds of `REPEATS` sweeps, its programs already compiled."""
    return statistics.median(rnnlab_sweep()[0] for _ in range(REPEATS))


def _machine() -> str:
    device = jax.devices()[0]
    return (f"jax {jax.__version__} on {device.platform} ({device.device_kind}), PyTorch's loop on "
            f"{_torch_device().upper()}")


def _row(name, ours, peer, ratio, target, holds):
    return f"| {name} | {ours} | {peer} | {ratio} | {target} | {holds} |"


def main():
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = end_to_end(cache_dir)
        warm = end_to_end(cache_dir)
    jax.config.update("jax_compilation_cache_dir", "")  # in this process: cold compiles, then steady state
    one_device = steady_in_fresh_process(one_device=True)
    # Asked here, not at import: the first question about devices fixes them, and `use_cpu_cores` comes first.
    flow_unrolled = steady_in_fresh_process(env=FLOW_UNROLL) if jax.default_backend() == "gpu" else None
    first_seconds, ours = rnnlab_sweep()
    steady = steady_seconds()
    # Before PyTorch's loop: its OpenMP workers keep spinning after it, and would slow the matmul (a lower limit).
    # A steadier reference beside it: the sweep's small batched matmuls ran at 92 GFLOP/s one day and 10-49 the
    # next on the same kind of machine, a large matmul at 113-158. Imported here: `bench_cells` asks for the
    # devices when imported, which must come after `use_cpu_cores`.
    from bench_cells import PEAK_SIZE, matmul_peak

    throughput, peak = matmul_throughput(), matmul_peak()
    torch_seconds, theirs = torch_sweep()
    limit, peak_limit = (unavoidable_flops() / (rate * 1e9) for rate in (throughput, peak))
    # The two sweeps draw different random weights; their values agree where both are finite (tests/test_gradflow.py
    # checks that with the same weights). What differs is where float32 gives up: 0 (log -inf) or inf.
    finite_ours, finite_theirs = np.isfinite(ours).mean(), np.isfinite(theirs).mean()
    print(f"gradient-flow sweep: {len(CELLS)} cells × {len(GAINS)} gains × {SEEDS} seeds, batch {BATCH}, "
          f"input {INPUT}, hidden {HIDDEN}, T = {SEQ_LEN}; {_machine()}. Matmul throughput at the sweep's shape "
          f"[{len(GAINS) * SEEDS}, {BATCH}, {HIDDEN}] @ [.., {HIDDEN}, {4 * HIDDEN}]: {throughput:.0f} GFLOP/s; "
          f"unavoidable work {unavoidable_flops() / 1e9:.0f} GFLOP, so the arithmetic limit is {limit:.3f} s "
          f"({peak_limit:.3f} s at a {PEAK_SIZE}² matmul's {peak:.0f} GFLOP/s).")
    print()
    print(_row(*HEADER))
    print(_row(*["---"] * 6))
    rows = [
        ("sweep steady state vs pytorch retain_grad loop (s)", steady, torch_seconds, torch_seconds / steady, 3.0),
        ("sweep end to end, fresh process, cold cache (s)", cold, torch_seconds, torch_seconds / cold, 1.5),
        ("sweep end to end, fresh process, warm cache (s)", warm, torch_seconds, torch_seconds / warm, 3.0),
    ]
    for name, ours_s, peer_s, ratio, target in rows:
        print(_row(name, f"{ours_s:.2f}", f"{peer_s:.2f}", f"{ratio:.2f}x", f">= {target}x",
                   "yes" if ratio >= target else "no"))
    print(_row("sweep steady state / arithmetic limit", f"{steady:.2f}", f"{limit:.3f}", f"{steady / limit:.2f}x",
               "<= 1.5x", "yes" if steady / limit <= 1.5 else "no"))
    print(_row(f"sweep steady state / limit at a {PEAK_SIZE}² matmul's rate", f"{steady:.2f}", f"{peak_limit:.3f}",
               f"{steady / peak_limit:.2f}x", "", "info"))
    print(_row("compile time in process (first call - steady, s)", f"{first_seconds - steady:.2f}", "", "", "",
               "info"))
    print(_row(f"sweep steady state, configurations sharded over {len(jax.devices())} devices vs 1 device (s)",
               f"{steady:.2f}", f"{one_device:.2f}", f"{one_device / steady:.2f}x", "", "info"))
    if flow_unrolled is not None:
        print(_row("sweep steady state, gradient-flow loops unrolled 8 steps vs 1 (default) (s)",
                   f"{flow_unrolled:.3f}", f"{steady:.3f}", f"{steady / flow_unrolled:.2f}x", "", "info"))
    print(_row("fraction of (config, t) finite and non-zero", f"{finite_ours:.3f}", f"{finite_theirs:.3f}", "",
               "", "info"))


if __name__ == "__main__":
    if "--steady" in sys.argv:
        sweep.use_cpu_cores(1 if "--one-device" in sys.argv else None)
        rnnlab_sweep()  # compiles
        print(f"STEADY {steady_seconds()}")
        sys.exit()
    sweep.use_cpu_cores()  # as experiments/gradient_flow.py does: the configurations shard over both cores
    if "--once" in sys.argv:
        rnnlab_sweep()
    else:
        main()
