"""Memory for very long sequences: plain against rematerialised BPTT, as T grows to 100 000 (batch 8, hidden 256).

Peak memory is XLA's own accounting of each compiled program (`compiled.memory_analysis()`: temporaries +
arguments + outputs), which is exact for the program and does not depend on what else the machine is doing, plus
the workspace the native gradient-flow kernel holds outside it (plain gradient flow on CPU in float32). Two
programs per T: ``gradflow.grad_norms`` (every log10 ||∂L/∂h_t||) and a training gradient (``jax.grad`` of a
squared loss on `rnnlab.models.ManyToOne`, as `rnnlab.train` takes it), each plain and with ``remat ≈ √T``. Then
both remat programs are run at T = 100 000.

What backpropagation through time stores is the rest: the temporaries and the native workspace, without the
inputs ``[T, batch, input]`` (arguments, ``T`` of them whatever the method). Its growth from the second-longest to
the longest T, as an exponent (``log(m₂ / m₁) / log(T₂ / T₁)``: 1 for linear growth, 0.5 for ``√T``), is the
target: at most 0.5 with remat.

    python benchmarks/bench_long_sequences.py
    RNNLAB_BENCH_QUICK=1 python benchmarks/bench_long_sequences.py
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp

import rnnlab
from rnnlab import gradflow, models, native

QUICK = bool(os.environ.get("RNNLAB_BENCH_QUICK"))
BATCH, INPUT, HIDDEN = (2, 4, 16) if QUICK else (8, 32, 256)
SEQ_LENS = (100, 1_000) if QUICK else (1_000, 10_000, 100_000)
BUDGET_GIB = 4.0
#: The largest growth exponent of the memory BPTT stores with remat: √T.
REMAT_EXPONENT = 0.5


def programs(model, params, seq_len: int):
    """The two programs for ``model`` (a `models.ManyToOne`, with its remat) and its ``params``, compiled."""
    xs = jax.ShapeDtypeStruct((seq_len, BATCH, INPUT), jnp.float32)

    def flow(p, x):
        return gradflow.grad_norms(model.cell, p["cell"], x, remat=model.remat)

    def train_grad(p, x):
        return jax.grad(lambda p: jnp.mean((model(p, x) - 1.0) ** 2))(p)

    return {name: jax.jit(fn).lower(params, xs).compile()
            for name, fn in (("gradflow", flow), ("training", train_grad))}


def peak_gib(compiled, workspace: int = 0) -> float:
    """XLA's accounting of the program, plus ``workspace`` bytes a native kernel holds outside it."""
    memory = compiled.memory_analysis()
    return (memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
            + workspace) / 2**30


def stored_gib(compiled, workspace: int = 0) -> float:
    """What the program holds besides its arguments and results: temporaries, and a native kernel's workspace."""
    return (compiled.memory_analysis().temp_size_in_bytes + workspace) / 2**30


def workspace_bytes(cell, name: str, seq_len: int, remat) -> int:
    """The gradient-flow kernel's own workspace (one thread: one configuration), where the program calls it."""
    return native.flow_workspace_bytes(cell, seq_len, BATCH, remat) if name == "gradflow" else 0


def growth_exponent(small: float, large: float, t_small: int, t_large: int) -> float:
    """``m ∝ T^e``'s ``e`` from two points: 1 for linear growth, 0.5 for ``√T``."""
    return math.log(large / small) / math.log(t_large / t_small)


def main():
    cell = rnnlab.LSTM(HIDDEN)
    params = models.ManyToOne(cell, 1).init(jax.random.PRNGKey(0), INPUT)
    print(f"long sequences: LSTM, batch {BATCH}, input {INPUT}, hidden {HIDDEN}; peak memory from XLA's accounting "
          "(stored: without the arguments and results, i.e. without the inputs)")
    print(f"{'T':>8} {'remat':>6} {'gradflow GiB':>13} {'stored':>8} {'training GiB':>13} {'stored':>8}")
    compiled, stored = {}, {}
    for seq_len in SEQ_LENS:
        for remat in (None, rnnlab.remat_near_sqrt(seq_len)):
            compiled[seq_len, remat] = programs(models.ManyToOne(cell, 1, remat=remat), params, seq_len)
            row = []
            for name, program in compiled[seq_len, remat].items():
                workspace = workspace_bytes(cell, name, seq_len, remat)
                stored[seq_len, remat, name] = stored_gib(program, workspace)
                row.append(f"{peak_gib(program, workspace):>13.3f} {stored[seq_len, remat, name]:>8.3f}")
            print(f"{seq_len:>8} {remat or '-':>6} {' '.join(row)}")
    longest, shorter = SEQ_LENS[-1], SEQ_LENS[-2]
    remat = rnnlab.remat_near_sqrt(longest)
    xs = jax.random.normal(jax.random.PRNGKey(1), (longest, BATCH, INPUT))
    for name, program in compiled[longest, remat].items():
        start = time.perf_counter()
        jax.block_until_ready(program(params, xs))
        print(f"ran {name} at T = {longest} with remat = {remat}: {time.perf_counter() - start:.1f} s")
    print()
    print("| name | ours | peer | ratio | target | holds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in ("gradflow", "training"):
        gib = peak_gib(compiled[longest, remat][name], workspace_bytes(cell, name, longest, remat))
        plain = peak_gib(compiled[longest, None][name], workspace_bytes(cell, name, longest, None))
        print(f"| {name} peak memory at T = {longest}, remat {remat} vs plain (GiB) | {gib:.3f} | {plain:.3f} | "
              f"{plain / gib:.0f}x less | <= {BUDGET_GIB} GiB | {'yes' if gib <= BUDGET_GIB else 'no'} |")
    for name in ("gradflow", "training"):
        exponents = {method: growth_exponent(stored[shorter, chunk, name], stored[longest, chunk_long, name], shorter,
                                             longest)
                     for method, chunk, chunk_long in (("remat", rnnlab.remat_near_sqrt(shorter), remat),
                                                       ("plain", None, None))}
        print(f"| {name}: growth of the memory BPTT stores, T = {shorter} to {longest}, remat vs plain (exponent) | "
              f"{exponents['remat']:.2f} | {exponents['plain']:.2f} | | <= {REMAT_EXPONENT} | "
              f"{'yes' if exponents['remat'] <= REMAT_EXPONENT else 'no'} |")


if __name__ == "__main__":
    main()
