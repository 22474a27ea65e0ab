"""Teams of Pallas programs (rnnlab.native.pallas.team_size) on a GPU: correctness against XLA's loops, then
forward+backward time against XLA's loops, a single program where one holds W_h, other team sizes, and cuDNN."""
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, "benchmarks")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import rnnlab  # noqa: E402
from rnnlab.native import pallas  # noqa: E402
import bench_cells  # noqa: E402

print(jax.__version__, jax.devices(), "SMs", pallas._processors(), flush=True)


def make(kind, shape, team=None, pallas_on="1", precision=None, lengths=None):
    batch, steps, inputs, hidden = shape
    gates = {"LSTM": 4, "GRU": 3}.get(kind, 1)
    cell = rnnlab.RNN(hidden) if kind == "RNN" else getattr(rnnlab, kind)(hidden)
    params = cell.init(jax.random.PRNGKey(0), inputs)
    xs = jax.random.normal(jax.random.PRNGKey(1), (steps, batch, inputs))

    def loss(params, xs):
        ys, final = rnnlab.scan(cell, params, xs, lengths=lengths)
        return jnp.mean(ys**2) + sum(jnp.sum(jnp.cos(leaf)) for leaf in jax.tree_util.tree_leaves(final))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    saved = pallas.HELD_FLOATS, pallas.MAX_TEAM, os.environ.get("RNNLAB_PALLAS", "1")
    os.environ["RNNLAB_PALLAS"] = pallas_on
    if team is not None:
        pallas.MAX_TEAM = 16
        pallas.HELD_FLOATS = hidden * gates * hidden // team
    try:
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            lowered = grad.lower(params, xs)
            text = lowered.as_text()
            compiled = lowered.compile()
    finally:
        pallas.HELD_FLOATS, pallas.MAX_TEAM = saved[:2]
        os.environ["RNNLAB_PALLAS"] = saved[2]
    calls = text.count("xla.gpu.triton")
    return (lambda: jax.block_until_ready(compiled(params, xs))), calls


def check():
    print("== correctness (highest precision), max |diff| / max |ref| of every gradient", flush=True)
    for kind, hidden, team in [("LSTM", 128, None), ("GRU", 128, None), ("RNN", 256, None), ("RNN", 128, 4),
                               ("LSTM", 128, 8)]:
        for padded in (False, True):
            shape = (20, 37, 24, hidden)
            lengths = jnp.asarray((np.arange(20) * 7) % 37 + 1) if padded else None
            try:
                ref, _ = make(kind, shape, pallas_on="0", precision="highest", lengths=lengths)
                got, calls = make(kind, shape, team=team, precision="highest", lengths=lengths)
                want, have = ref(), got()
                errs = [float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                        for a, b in zip(jax.tree_util.tree_leaves(have), jax.tree_util.tree_leaves(want))]
                nan = any(bool(jnp.any(jnp.isnan(a))) for a in jax.tree_util.tree_leaves(have))
                print(f"{kind} {hidden} team {team or 'default'} padded {padded}: triton calls {calls}, "
                      f"max rel err {max(errs):.2e}, nan {nan}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{kind} {hidden} team {team} padded {padded}: FAILED {type(e).__name__}: {str(e)[:1500]}",
                      flush=True)


def median(call, n=20):
    for _ in range(3):
        call()
    ts = []
    for _ in range(n):
        s = time.perf_counter()
        call()
        ts.append(time.perf_counter() - s)
    return statistics.median(ts)


def timing():
    print("== ms per forward+backward (median of 20), default precision", flush=True)
    cases = [("LSTM", (16, 1000, 32, 128), [None, 8]), ("RNN", (16, 1000, 32, 128), [None, 2, 4]),
             ("RNN", (64, 200, 128, 256), [None, 8]), ("LSTM", (256, 100, 64, 128), [None]),
             ("GRU", (16, 1000, 32, 64), [None, 4]), ("LSTM", (64, 200, 128, 256), [16])]
    for kind, shape, teams in cases:
        row = {}
        try:
            call, _ = make(kind, shape, pallas_on="0")
            row["xla"] = median(call)
            for team in teams:
                call, calls = make(kind, shape, team=team)
                row[f"pallas team {team or 'default'} ({calls} calls)"] = median(call)
            row["torch cuDNN"] = median(bench_cells.torch_call(kind, shape))
        except Exception as e:  # noqa: BLE001
            row["error"] = float("nan")
            print("  error", type(e).__name__, str(e)[:800], flush=True)
        print(kind, shape, " | ".join(f"{k}: {v * 1e3:.2f} ms" for k, v in row.items()), flush=True)


if "--time" not in sys.argv[1:]:
    check()
if "--check" not in sys.argv[1:]:
    timing()
