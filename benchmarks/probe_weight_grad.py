"""Probe: where W_h's gradient is faster formed, summed in the backward kernel or by XLA's matmul after it.

For each cell and shape ``batch,T,input,hidden`` (default: the four of `bench_cells.py`), the gradient of
``mean(rnnlab.scan(cell, params, xs)[0] ** 2)`` compiled twice in one process, with `native.weight_grad_mode`
forced to ``"kernel"`` and to ``"xla"``, then timed interleaved (8 rounds of 3 calls each): the medians and their
ratio. What `native.MIN_ROWS_FOR_WEIGHT_GRAD` and `native.XLA_WEIGHT_GRAD_WITHOUT_AVX512` decide was measured with
it. Not run by `make bench`.

    python benchmarks/probe_weight_grad.py lstm,gru,rnn
    python benchmarks/probe_weight_grad.py rnn 32,100,64,128 64,200,128,256
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import rnnlab
from rnnlab import native

SHAPES = ((32, 100, 64, 128), (64, 200, 128, 256), (16, 1000, 32, 128), (128, 50, 256, 512))


def gradient(kind: str, shape, mode: str):
    batch, steps, inputs, hidden = shape
    cell = {"lstm": rnnlab.LSTM(hidden), "gru": rnnlab.GRU(hidden), "rnn": rnnlab.RNN(hidden)}[kind]
    params = cell.init(jax.random.PRNGKey(0), inputs)
    xs = jax.random.normal(jax.random.PRNGKey(1), (steps, batch, inputs))

    def loss(params, xs):
        return jnp.mean(rnnlab.scan(cell, params, xs)[0] ** 2)

    default = native.weight_grad_mode
    native.weight_grad_mode = lambda cell, rows: mode
    try:
        lowered = jax.jit(jax.grad(loss)).lower(params, xs)  # traced under the forced mode
    finally:
        native.weight_grad_mode = default
    assert f"weight_grad = {str(mode == 'kernel').lower()}" in lowered.as_text()
    compiled = lowered.compile()
    return lambda: jax.block_until_ready(compiled(params, xs))


def main(argv: list[str]) -> None:
    kinds = argv[0].split(",") if argv else ["lstm", "gru", "rnn"]
    shapes = [tuple(map(int, arg.split(","))) for arg in argv[1:]] or SHAPES
    print(f"jax {jax.__version__}, kernels with {native.vector_lanes()}-float vectors, {native.threads()} threads")
    for kind in kinds:
        for shape in shapes:
            calls = {mode: gradient(kind, shape, mode) for mode in ("kernel", "xla")}
            times = {mode: [] for mode in calls}
            for call in calls.values():
                call()
            for _ in range(8):
                for mode, call in calls.items():
                    for _ in range(3):
                        start = time.perf_counter()
                        call()
                        times[mode].append(time.perf_counter() - start)
            kernel, xla = (1e3 * np.median(times[mode]) for mode in ("kernel", "xla"))
            print(f"{kind} {','.join(map(str, shape))}: kernel sum {kernel:.1f} ms, XLA's matmul {xla:.1f} ms, "
                  f"XLA / kernel {xla / kernel:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
