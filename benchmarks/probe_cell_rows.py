"""Probe: the cells' training gradient (`bench_cells.rnnlab_call`: `jax.grad` of the mean square of `rnnlab.scan`'s
outputs) and their forward pass alone, ms per call, with the native library built from a given source, so that two
versions of `rnnlab/native/recurrent.cc` can be timed in alternating fresh processes on the same machine. Measured
with it (2026-11-27): the cell kernels' loops split by rows (`split_of`) against the team that split hidden units
before. Not run by `make bench`.

    git show ff579c1:rnnlab/native/recurrent.cc > /tmp/units.cc   # before the split by rows
    for round in 1 2 3; do
      python benchmarks/probe_cell_rows.py --source /tmp/units.cc
      python benchmarks/probe_cell_rows.py
    done

Each figure is the median (and the fastest) of `bench_cells.blocked_medians`' calls, the gradient's and the
forward's blocks alternating, default parameters; the rate counts `bench_cells.train_flops`. (The record of
2026-11-27, `cpu_runs/2026-11-27-avx512-cell-rows.txt`, took the median of 15 consecutive calls of each, and
counted 3 x batch x (input + hidden) x gates·hidden multiply-adds a step.)
"""

from __future__ import annotations

import sys
from pathlib import Path

#: (cell, batch, T, input, hidden): the four benchmark shapes, and others around the split's threshold.
SHAPES = (("LSTM", 32, 100, 64, 128), ("GRU", 32, 100, 64, 128), ("RNN", 32, 100, 64, 128),
          ("LSTM", 64, 200, 128, 256), ("GRU", 64, 200, 128, 256), ("RNN", 64, 200, 128, 256),
          ("LSTM", 16, 1000, 32, 128), ("GRU", 16, 1000, 32, 128), ("RNN", 16, 1000, 32, 128),
          ("LSTM", 128, 50, 256, 512), ("GRU", 128, 50, 256, 512), ("RNN", 128, 50, 256, 512))


def measure(shapes=SHAPES) -> list[dict]:
    """Each shape's median ms per gradient and per forward pass, and the gradient's arithmetic rate (GFLOP/s)."""
    import jax
    from bench_cells import blocked_medians, rnnlab_call, train_flops

    import rnnlab
    from rnnlab import native

    out = []
    for kind, *shape in shapes:
        batch, steps, inputs, hidden = shape
        cell = getattr(rnnlab, kind)(hidden_size=hidden)
        params = cell.init(jax.random.PRNGKey(0), inputs)
        xs = jax.random.normal(jax.random.PRNGKey(1), (steps, batch, inputs))
        forward = jax.jit(lambda p, x, cell=cell: rnnlab.scan(cell, p, x)[0])
        medians, fastest, _ = blocked_medians(
            {"grad": rnnlab_call(kind, shape), "forward": lambda: forward(params, xs).block_until_ready()})
        flops = train_flops(kind, shape)
        out.append({"shape": f"{kind} {batch},{steps},{inputs},{hidden}", "grad_ms": 1e3 * medians["grad"],
                    "grad_fastest_ms": 1e3 * fastest["grad"], "forward_ms": 1e3 * medians["forward"],
                    "forward_fastest_ms": 1e3 * fastest["forward"], "gflops": flops / medians["grad"] / 1e9,
                    "split": _split(native, cell, steps, batch)})
    return out


def _split(native, cell, steps: int, batch: int) -> str:
    try:
        parts, by_rows = native.cell_split(cell, steps, batch)
    except AttributeError:  # a library from before the groups of rows: teams that split the units
        return "units"
    return f"{parts} groups of rows" if by_rows else f"units over {parts}"


def main(argv=None) -> None:
    from probe_flow_groups import native_source

    label = native_source(argv, __doc__.split("\n\n")[0], "rnnlab_probe_cell_rows")
    for row in measure():
        print(f"{label}\t{row['shape']}\tgrad {row['grad_ms']:.2f} ms ({row['grad_fastest_ms']:.2f})\t"
              f"forward {row['forward_ms']:.2f} ms ({row['forward_fastest_ms']:.2f})\t{row['gflops']:.0f} GFLOP/s\t"
              f"{row['split']}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(sys.argv[1:])
