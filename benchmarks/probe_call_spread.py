"""Probe: how a cell's training gradient (`bench_cells.rnnlab_call`: `jax.grad` of the mean square of
`rnnlab.scan`'s outputs) spreads over many calls in one process, rnnlab's and torch's (`bench_cells.torch_call`),
with the native library built from a given source, so that two versions of `rnnlab/native/recurrent.cc` can be
compared in alternating fresh processes. Measured with it (2026-11-28): the kernels' helpers queued behind their
caller on one CPU (`benchmarks/README.md`, "The fragile row's slow calls"). Not run by `make bench`.

    git show f68d34f~1:rnnlab/native/recurrent.cc > /tmp/before.cc   # before `Aside`
    for round in 1 2 3; do
      python benchmarks/probe_call_spread.py --source /tmp/before.cc
      python benchmarks/probe_call_spread.py
    done

Each line: the fastest call and the 25th, 50th, 75th and 90th percentiles of CALLS consecutive calls after two
warm-up calls, in ms. A median far above the fastest call with a tight torch beside it is this process's doing; both
spread alike, the host's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

#: (cell, batch, T, input, hidden): the fixed-cost shape of `bench_cells.py`, where a kernel's call is shortest.
SHAPES = (("LSTM", 32, 100, 64, 128), ("GRU", 32, 100, 64, 128), ("RNN", 32, 100, 64, 128))
CALLS = 300
PERCENTILES = (0, 25, 50, 75, 90)


def spread(call, calls: int = CALLS) -> list[float]:
    """The `PERCENTILES` of ``calls`` timed calls of ``call`` after two untimed ones, in ms."""
    import numpy as np

    call(), call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(1e3 * (time.perf_counter() - start))
    return [float(v) for v in np.percentile(times, PERCENTILES)]


def main(argv=None) -> None:
    from bench_cells import rnnlab_call, torch_call
    from probe_flow_groups import native_source

    label = native_source(argv, __doc__.split("\n\n")[0], "rnnlab_probe_call_spread")
    print("\t".join(["source", "shape", "library", *(f"{p} %" for p in PERCENTILES)]))
    for kind, *shape in SHAPES:
        for library, make in (("rnnlab", rnnlab_call), ("torch", torch_call)):
            figures = spread(make(kind, tuple(shape)))
            print("\t".join([label, f"{kind} {','.join(map(str, shape))}", library, *(f"{v:.2f}" for v in figures)]),
                  flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(sys.argv[1:])
