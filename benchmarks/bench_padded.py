"""Padded sequences: rnnlab's LSTM and GRU forward+backward on a batch of sequences of different lengths, against
torch.nn with packed sequences and flax's ``nn.RNN`` with ``seq_lengths``.

Each sequence's length is drawn uniformly from ``[T / 2, T]`` (seed 0; one sequence of full length). Each
measurement is one training-style call (`bench_cells.py`'s, given ``lengths``), the loss the mean square of the
outputs with the padded ones zero, as each library's users make it:

- rnnlab: ``jax.jit(jax.grad(loss))(params, xs)`` with ``rnnlab.scan(cell, params, xs, lengths=lengths)``
  (time-major; padded outputs are zero), which runs the masked twins of the native kernels on a CPU
  (`rnnlab.native`);
- torch: ``module(pack_padded_sequence(xs, lengths, enforce_sorted=False))``, then ``pad_packed_sequence``, with
  ``torch.nn.LSTM / GRU`` and ``torch.set_num_threads(2)``;
- flax (LSTM only): ``nn.RNN(nn.OptimizedLSTMCell(hidden))(xs, seq_lengths=lengths)``, batch-major, the padded
  outputs masked in the loss.

The details table also shows rnnlab on XLA alone (``RNNLAB_NATIVE=0``: the masked fused loop, which every padded
batch ran until the kernels took masks). Timing as in ``bench_cells.py`` (`blocked_medians`).

    python benchmarks/bench_padded.py            # two of the speed issue's shapes
    python benchmarks/bench_padded.py --quick    # tiny shapes, one call each (or RNNLAB_BENCH_QUICK=1)

Prints a details table, then the targets as ``| name | ours | peer | ratio | target | holds |`` rows (the format
`benchmarks/run.py` collects): at least as fast as torch, as for full-length sequences (`bench_cells.py`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from bench_cells import (QUICK, TORCH_TARGET, _ms, _table, _torch, _torch_device, blocked_medians, flax_call,
                         rnnlab_call, torch_call)

#: (batch, T, input, hidden): the speed issue's step-bound shape and its middle one.
SHAPES = ((5, 6, 3, 16),) if QUICK else ((32, 100, 64, 128), (64, 200, 128, 256))
CELLS = ("LSTM", "GRU")
#: The timed columns of the details table.
COLUMNS = ("rnnlab", "rnnlab XLA only", "torch packed", "flax seq_lengths")


def lengths_of(batch: int, seq_len: int) -> np.ndarray:
    lengths = np.random.default_rng(0).integers(seq_len // 2, seq_len + 1, size=batch)
    lengths[0] = seq_len
    return lengths.astype(np.int32)


def main() -> None:
    torch = _torch()
    print(f"bench_padded: jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({_torch_device(torch)}, {torch.get_num_threads()} threads), {os.cpu_count()} CPU cores"
          + (", QUICK mode" if QUICK else ""))
    details, targets = [], []
    for shape in SHAPES:
        shape_name = ",".join(map(str, shape))
        lengths = lengths_of(shape[0], shape[1])
        jax_lengths = jnp.asarray(lengths)
        for kind in CELLS:
            calls = {"rnnlab": rnnlab_call(kind, shape, lengths=jax_lengths),
                     "rnnlab XLA only": rnnlab_call(kind, shape, {"RNNLAB_NATIVE": "0"}, jax_lengths),
                     "torch packed": torch_call(kind, shape, lengths)}
            if kind == "LSTM":
                calls["flax seq_lengths"] = flax_call(shape, jax_lengths)
            medians, fastest, _ = blocked_medians(calls)
            details.append([kind, shape_name, f"{lengths.min()}-{lengths.max()} (mean {lengths.mean():.0f})"]
                           + [f"{_ms(medians[name])} ({_ms(fastest[name])})" if name in medians else "—"
                              for name in COLUMNS])
            ratio = medians["torch packed"] / medians["rnnlab"]
            targets.append((f"{kind} {shape_name} padded vs torch.nn.{kind} packed", _ms(medians["rnnlab"]),
                            _ms(medians["torch packed"]), f"{ratio:.2f}x", f">= {TORCH_TARGET:.2f}x",
                            "yes" if ratio >= TORCH_TARGET else "no"))
            if kind == "LSTM":
                ratio = medians["flax seq_lengths"] / medians["rnnlab"]
                targets.append((f"LSTM {shape_name} padded vs flax seq_lengths", _ms(medians["rnnlab"]),
                                _ms(medians["flax seq_lengths"]), f"{ratio:.2f}x", "printed", "info"))
    _table(("cell", "batch,T,input,hidden", "lengths", "rnnlab median (fastest)", *COLUMNS[1:]), details)
    print()
    _table(("name", "ours", "peer", "ratio", "target", "holds"), targets)


if __name__ == "__main__":
    main()
