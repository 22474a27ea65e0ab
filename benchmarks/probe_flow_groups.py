"""Probe: `gradflow.grad_norms` of a single configuration (one sequence batch), ms per call, with the native
library built from a given source, so that two versions of `rnnlab/native/recurrent.cc` can be timed in
alternating fresh processes on the same machine. Measured with it (2026-11-27): groups of rows (`native.flow_groups`)
against the team that split hidden units before them. Not run by `make bench`.

    git show bf97c6a:rnnlab/native/recurrent.cc > /tmp/teams.cc   # before the groups of rows
    for round in 1 2 3; do
      python benchmarks/probe_flow_groups.py --source /tmp/teams.cc
      python benchmarks/probe_flow_groups.py
    done

Each figure is the median of 9 calls after one warm-up call; inputs 32 features, default parameters. Arithmetic:
a step's forward multiply-adds are rows x (32 + hidden) x gates·hidden, its backward rows x gates·hidden x hidden.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

#: (cell, rows, hidden, T)
SHAPES = (("LSTM", 16, 128, 1000), ("LSTM", 64, 128, 1000), ("GRU", 32, 128, 1000), ("GRU", 64, 128, 1000),
          ("RNN", 32, 256, 1000), ("LSTM", 16, 512, 300), ("LSTM", 32, 512, 300), ("LSTM", 64, 256, 500),
          ("LSTM", 8, 256, 2000))
INPUTS = 32


def measure(shapes=SHAPES, calls: int = 9) -> list[dict]:
    """Each shape's median ms per `grad_norms` call and its arithmetic rate (GFLOP/s)."""
    import jax
    from bench_cells import GATES

    import rnnlab
    from rnnlab import gradflow, native

    rows_out = []
    for kind, rows, hidden, steps in shapes:
        cell = getattr(rnnlab, kind)(hidden_size=hidden)
        params = cell.init(jax.random.PRNGKey(0), INPUTS)
        xs = jax.random.normal(jax.random.PRNGKey(1), (steps, rows, INPUTS))
        norms = jax.jit(lambda p, x, cell=cell: gradflow.grad_norms(cell, p, x))
        norms(params, xs).block_until_ready()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            norms(params, xs).block_until_ready()
            times.append(time.perf_counter() - start)
        width = GATES[kind] * hidden
        flops = 2 * steps * rows * ((INPUTS + hidden) * width + width * hidden)
        median = statistics.median(times)
        rows_out.append({"shape": f"{kind} {rows},{hidden},{steps}", "ms": 1e3 * median, "gflops": flops / median / 1e9,
                         "groups": _groups(native, rows), "team": native.flow_team(cell, 1, rows)})
    return rows_out


def _groups(native, rows: int) -> int:
    try:
        return native.flow_groups(rows)
    except AttributeError:  # a library from before the groups: none
        return 1


def native_source(argv, description: str, cache: str) -> str:
    """Parses ``--source`` (a ``recurrent.cc`` to build `rnnlab.native`'s library from; default the tree's) from
    ``argv`` and points `rnnlab.native` at it, with a library cache of its own (``cache`` in the temporary
    directory), before anything is built; returns the label to print beside the figures."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--source", help="recurrent.cc to build the library from (default: the tree's)")
    args = parser.parse_args(argv)
    if args.source:  # a library of its own, cached apart from the tree's
        os.environ["RNNLAB_NATIVE_CACHE"] = os.path.join(tempfile.gettempdir(), cache)
        from rnnlab import native

        native._SOURCE = Path(args.source).resolve()
    return args.source or "tree"


def main(argv=None) -> None:
    label = native_source(argv, __doc__.split("\n\n")[0], "rnnlab_probe_flow_groups")
    for row in measure():
        print(f"{label}\t{row['shape']}\t{row['ms']:.1f} ms\t{row['gflops']:.0f} GFLOP/s\t"
              f"groups {row['groups']} team {row['team']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
