"""GPU probe (one device call): Pallas single-program recurrences vs rnnlab vs cuDNN, and XLA flag variants.

    python .probe/gpu_probe.py pallas      # Pallas LSTM/RNN fwd+bwd at the step-bound shapes
    python .probe/gpu_probe.py cells       # rnnlab's LSTM/GRU/RNN at 16,1000,32,128 under this process's XLA_FLAGS
"""
import os
import statistics
import sys
import time
import traceback

sys.path[:0] = [os.path.dirname(__file__), os.path.join(os.path.dirname(__file__), "..", "benchmarks"),
                os.path.join(os.path.dirname(__file__), "..")]
import jax
import jax.numpy as jnp

import bench_cells as bc
import pallas_rnn as pr

HI = jax.lax.Precision.HIGHEST
INTERPRET = bool(os.environ.get("PROBE_INTERPRET"))
SHAPES = ((16, 40, 8, 128),) if INTERPRET else ((16, 1000, 32, 128), (32, 100, 64, 128), (64, 200, 128, 256))


def medians(calls, rounds=7, block=3):
    first = {}
    for name, call in list(calls.items()):
        try:
            start = time.perf_counter()
            call()
            first[name] = time.perf_counter() - start
            call()
        except Exception as e:  # noqa: BLE001
            print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
            traceback.print_exc(limit=3)
            del calls[name]
    times = {n: [] for n in calls}
    for _ in range(rounds):
        for n, call in calls.items():
            for i in range(block):
                s = time.perf_counter()
                call()
                if i:
                    times[n].append(time.perf_counter() - s)
    return {n: statistics.median(t) for n, t in times.items()}, first


def pallas_call(kind, shape, precision=None, num_warps=4, **extra):
    B, T, I, H = shape
    params = pr.params_for(kind, I, H)
    xs = jax.random.normal(jax.random.PRNGKey(1), (T, B, I))
    make = pr.make_lstm if kind == "lstm" else pr.make_rnn
    f = make(precision, num_warps=num_warps, interpret=INTERPRET, **extra)
    grad = jax.jit(jax.grad(lambda p, x: jnp.mean(f(p, x) ** 2)))
    return lambda: jax.block_until_ready(grad(params, xs))


def check(kind, shape, num_warps):
    B, T, I, H = shape
    params = pr.params_for(kind, I, H)
    xs = jax.random.normal(jax.random.PRNGKey(1), (T, B, I))
    loss = lambda f: (lambda p, x: jnp.mean(f(p, x) ** 2))
    make = pr.make_lstm if kind == "lstm" else pr.make_rnn
    out = []
    for prec in (HI, None):
        g1 = jax.jit(jax.grad(loss(make(prec, num_warps=num_warps, interpret=INTERPRET))))(params, xs)
        with jax.default_matmul_precision("highest"):
            g2 = jax.jit(jax.grad(loss(pr.plain(kind, HI))))(params, xs)
        out.append({k: float(jnp.max(jnp.abs(g1[k] - g2[k])) / jnp.max(jnp.abs(g2[k]))) for k in g2})
    print(f"  check {kind} {shape} warps {num_warps}: max rel err vs float32-highest scan, "
          f"pallas highest {out[0]}, pallas default {out[1]}", flush=True)


def pallas_main():
    print("jax", jax.__version__, jax.devices(), flush=True)
    for shape in SHAPES:
        for kind, name in (("lstm", "LSTM"), ("rnn", "RNN")):
            print(f"== {name} {shape}", flush=True)
            for w in (4, 8):
                try:
                    check(kind, shape, w)
                except Exception as e:  # noqa: BLE001
                    print(f"  check warps {w} FAILED {type(e).__name__}: {str(e)[:800]}", flush=True)
            calls = {"rnnlab": bc.rnnlab_call(name, shape), "pallas w4": pallas_call(kind, shape, num_warps=4),
                     "pallas w8": pallas_call(kind, shape, num_warps=8), "torch cuDNN": bc.torch_call(name, shape)}
            if kind == "rnn" and shape[3] == 128:
                calls["pallas w8 W held"] = pallas_call(kind, shape, num_warps=8, hoist=True)
            med, first = medians(calls)
            print("  " + " | ".join(f"{n} {m * 1e3:.3f} ms (1st {first[n]:.2f} s)" for n, m in med.items()),
                  flush=True)
            if "torch cuDNN" in med:
                print("  ratios torch/x: " + ", ".join(f"{n} {med['torch cuDNN'] / m:.2f}" for n, m in med.items()),
                      flush=True)


def cells_main():
    print("XLA_FLAGS=", os.environ.get("XLA_FLAGS", ""), "RNNLAB_GPU_UNROLL=", os.environ.get("RNNLAB_GPU_UNROLL"),
          flush=True)
    shape = (16, 1000, 32, 128)
    for name in ("LSTM", "GRU", "RNN"):
        med, first = medians({"rnnlab": bc.rnnlab_call(name, shape), "torch": bc.torch_call(name, shape)},
                             rounds=5)
        print(f"  {name} {shape}: rnnlab {med['rnnlab'] * 1e3:.3f} ms (1st {first['rnnlab']:.2f} s), torch "
              f"{med['torch'] * 1e3:.3f} ms, torch/rnnlab {med['torch'] / med['rnnlab']:.2f}", flush=True)


if __name__ == "__main__":
    {"pallas": pallas_main, "cells": cells_main}[sys.argv[1]]()
