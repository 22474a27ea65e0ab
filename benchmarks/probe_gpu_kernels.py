"""Probe (GPU): the Pallas kernels where `bench_cells.py` does not time them — the LSTM and GRU at hidden 64 (one
program per 16 rows), and padded sequences (the masked kernels, at hidden 128 those of the LSTM's and GRU's teams)
— against rnnlab on XLA's loops and torch's cuDNN.

`bench_cells.py`'s shapes have hidden 128 and more, where the LSTM and GRU run as teams or keep XLA's loops. For
each cell and shape, one training-style call (`bench_cells.py`'s): rnnlab as by default (the kernels, each step's
inputs read one step ahead), ``RNNLAB_PALLAS=0`` (XLA's loops, unrolled 8 steps: what ran before),
``RNNLAB_PALLAS_AHEAD=0`` (the inputs read when used) and ``torch.nn`` on CUDA (cuDNN; packed sequences where
padded); timed as `bench_cells.py` times (`blocked_medians`). Padded rows take lengths from ``[T/2, T]``
(`bench_padded.lengths_of`).
Not run by `make bench`; `benchmarks/gpu.sh` runs it.

    python benchmarks/probe_gpu_kernels.py
"""

from __future__ import annotations

import jax
from bench_cells import _ms, _table, blocked_medians, rnnlab_call, torch_call
from bench_padded import lengths_of

#: (cell, batch, T, input, hidden, padded)
CASES = tuple((kind, *shape, False) for kind in ("LSTM", "GRU", "RNN")
              for shape in ((16, 1000, 32, 64), (32, 100, 64, 64))) + tuple(
    (kind, 16, 1000, 32, 64, True) for kind in ("LSTM", "GRU", "RNN")) + tuple(
    (kind, 16, 1000, 32, 128, True) for kind in ("LSTM", "GRU"))


def main() -> None:
    print(f"probe_gpu_kernels: jax {jax.__version__} ({jax.default_backend()}, {jax.devices()[0].device_kind})")
    rows = []
    for kind, batch, steps, inputs, hidden, padded in CASES:
        shape = (batch, steps, inputs, hidden)
        lengths = lengths_of(batch, steps) if padded else None
        calls = {"rnnlab": rnnlab_call(kind, shape, lengths=lengths),
                 "XLA loops": rnnlab_call(kind, shape, {"RNNLAB_PALLAS": "0"}, lengths=lengths),
                 "not ahead": rnnlab_call(kind, shape, {"RNNLAB_PALLAS_AHEAD": "0"}, lengths=lengths),
                 "torch": torch_call(kind, shape, lengths=lengths)}
        medians, fastest, _ = blocked_medians(calls)
        rows.append([kind, ",".join(map(str, shape)), f"{lengths.min()}-{steps}" if padded else "all"]
                    + [f"{_ms(medians[name])} ({_ms(fastest[name])})" for name in calls]
                    + [f"{medians[name] / medians['rnnlab']:.2f}x" for name in ("XLA loops", "torch")]
                    + [f"{medians['rnnlab'] / (2 * steps) * 1e6:.2f}"])
        print(*rows[-1], sep=" | ", flush=True)
    _table(("cell", "batch,T,input,hidden", "lengths", "rnnlab median (fastest)", "XLA loops", "not reading ahead",
            "torch (cuDNN)", "XLA loops / rnnlab", "torch / rnnlab", "µs a step (fwd+bwd)"), rows)


if __name__ == "__main__":
    main()
