"""Probe: hidden sizes off the kernels' multiple of 16, which run padded to the next one (`native.kernel_hidden`).

For each cell and hidden size, one training-style call (`bench_cells.py`'s) at batch 32, T = 100, input 64: rnnlab
(the kernels, padded), rnnlab on XLA alone (``RNNLAB_NATIVE=0``: what these sizes ran before the padding), rnnlab
at the padded size itself (what the padding costs on top of the kernels) and ``torch.nn`` with 2 threads; timed as
`bench_cells.py` times (`blocked_medians`). Not run by `make bench`.

    python benchmarks/probe_hidden_sizes.py                 # hidden 20, 50, 100, 200
    python benchmarks/probe_hidden_sizes.py 100 LSTM,GRU    # some sizes, some cells
"""

from __future__ import annotations

import sys

from bench_cells import CELLS, _ms, _table, blocked_medians, rnnlab_call, torch_call

from rnnlab import native

BATCH, STEPS, INPUTS = 32, 100, 64


def main() -> None:
    sizes = [int(size) for size in sys.argv[1].split(",")] if len(sys.argv) > 1 else [20, 50, 100, 200]
    cells = sys.argv[2].split(",") if len(sys.argv) > 2 else CELLS
    rows = []
    for kind in cells:
        for hidden in sizes:
            shape, padded = (BATCH, STEPS, INPUTS, hidden), native.kernel_hidden(hidden)
            calls = {"rnnlab": rnnlab_call(kind, shape),
                     "XLA only": rnnlab_call(kind, shape, {"RNNLAB_NATIVE": "0"}),
                     "padded size": rnnlab_call(kind, (BATCH, STEPS, INPUTS, padded)),
                     "torch": torch_call(kind, shape)}
            medians, fastest, _ = blocked_medians(calls)
            rows.append([kind, hidden, padded] + [f"{_ms(medians[name])} ({_ms(fastest[name])})" for name in calls]
                        + [f"{medians['XLA only'] / medians['rnnlab']:.2f}x",
                           f"{medians['torch'] / medians['rnnlab']:.2f}x"])
    _table(("cell", "hidden", "runs at", "rnnlab median (fastest)", "XLA only", "at the padded size", "torch",
            "vs XLA only", "vs torch"), rows)


if __name__ == "__main__":
    main()
