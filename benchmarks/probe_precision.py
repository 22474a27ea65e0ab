"""Probe: how far the matmul precision moves a gradient-flow measurement (what TF32 costs on a GPU).

The benchmark sweep's cells and sizes (3 cells × 6 gains × 2 seeds, batch 16, input 32, hidden 128, T = 500), every
log10 ||∂L/∂h_t|| measured at JAX's default matmul precision and again at ``"highest"`` (full float32). On a CPU the
two are the same program; on an NVIDIA GPU the default lets XLA use TF32 tensor cores (10-bit mantissa). Prints, per
cell, the largest and median difference of the log10 norms where both are finite, and of the fitted decay rate per
step (`sweep.fit_rate` over the last half of the lags). Not run by `make bench`.

    python benchmarks/probe_precision.py
"""

from __future__ import annotations

import jax
import numpy as np

from rnnlab import sweep

GAINS, SEEDS, BATCH, INPUT, HIDDEN, SEQ_LEN = (0.5, 0.8, 1.0, 1.2, 1.5, 2.0), 2, 16, 32, 128, 500


def table(name: str, precision: str) -> np.ndarray:
    with jax.default_matmul_precision(precision):
        norms, _, _ = sweep.grad_norm_table(sweep.make_cell(name, HIDDEN), sweep.Grid.product(GAINS, range(SEEDS)),
                                            SEQ_LEN, input_size=INPUT, batch=BATCH)
    return np.asarray(norms, np.float64)


def main() -> None:
    device = jax.devices()[0]
    print(f"probe_precision: jax {jax.__version__} on {device.platform} ({device.device_kind})")
    print("| cell | max abs Δ log10 norm | median abs Δ | max abs Δ rate per step | finite in both |")
    print("| --- | --- | --- | --- | --- |")
    lags = np.arange(SEQ_LEN)[::-1]
    for name in ("rnn_tanh", "lstm", "gru"):
        default, highest = table(name, "default"), table(name, "highest")
        both = np.isfinite(default) & np.isfinite(highest)
        delta = np.abs(default - highest)[both]
        half = slice(SEQ_LEN // 2, None)
        rates = [abs(sweep.fit_rate(lags[half], a[half]) - sweep.fit_rate(lags[half], b[half]))
                 for a, b in zip(default, highest) if np.all(np.isfinite(a[half]) & np.isfinite(b[half]))]
        print(f"| {name} | {delta.max(initial=0):.2e} | {np.median(delta) if delta.size else 0:.2e} | "
              f"{max(rates, default=0):.2e} | {both.mean():.3f} |")


if __name__ == "__main__":
    main()
