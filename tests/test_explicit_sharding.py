"""`rnnlab.scan` in `jax.sharding`'s explicit mode (``jax.set_mesh`` over a mesh of `AxisType.Explicit` axes, whose
array types carry their sharding), with the batch split over 4 devices: the numbers of one device, nothing gathers
the batch, and the outputs' types stay split.

Explicit mode types a loop's carry and every op's sharding. Before, the built-in cells' kernels gathered a split
batch and ran whole on every device (their results typed replicated), a vmapped gradient failed on a reshape, and a
cell on the plain `lax.scan` path (a user's cell, ``unroll`` > 1) failed: its carry of zeros was replicated where
its steps returned it split. Now the kernels run in `jax.shard_map` on each device's rows (`rnnlab.native.bind`),
the initial carry is split as the inputs are (`rnnlab.scan.prepare`), and `Seq2Seq`'s token embeddings and shifted
targets are split as its tokens are (a lookup with no result sharding given, or a concatenation of a replicated and
a split block, failed).

A process fixes its device count when JAX starts, so the cases run in one fresh process with 4 virtual CPU devices
(this file as a script); each case's reference is the same function on unsplit inputs in that process (one device).
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 4


def _child(out: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    import rnnlab
    from rnnlab import models, native

    sys.path.insert(0, str(ROOT / "tests"))
    from user_cell import IndRNN

    xs = jax.random.normal(jax.random.key(1), (30, 32, 8))
    lengths = jnp.arange(32) % 30 + 1
    results = {"devices": len(jax.devices()), "kernels": native.available()}

    def relative_error(got, want):
        pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        assert pairs and all(np.shape(a) == np.shape(b) for a, b in pairs)
        return max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) for a, b in pairs)

    def case(name, function, args, split_args, mesh):
        """``function(*args)`` on one device against ``function(*split_args)`` within ``jax.set_mesh(mesh)``."""
        want = jax.jit(function)(*args)
        with jax.set_mesh(mesh):
            split_args = [jax.device_put(a, spec) if spec is not None else a for a, spec in split_args]
            compiled = jax.jit(function).lower(*split_args).compile().as_text()
            got = jax.jit(function)(*split_args)
        kernels = [line for line in compiled.splitlines() if 'custom_call_target="rnnlab' in line]
        results[name] = {"error": relative_error(got, want), "gathers": "all-gather" in compiled,
                         "kernel_rows": sorted({int(rows) for line in kernels
                                                for rows in re.findall(r"f32\[30,(\d+),", line)})}

    line = jax.make_mesh((DEVICES,), ("batch",), axis_types=(AxisType.Explicit,))
    grid = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    split = P(None, "batch")
    for cell in (rnnlab.LSTM(64), rnnlab.GRU(24), rnnlab.RNN(50, activation="relu")):
        kind = type(cell).__name__
        params = cell.init(jax.random.key(0), 8)

        def loss(p, x, lengths=None, cell=cell):
            return jnp.mean(rnnlab.scan(cell, p, x, lengths=lengths)[0] ** 2)

        case(f"{kind} grad", jax.grad(loss), (params, xs), [(params, None), (xs, split)], line)
        case(f"{kind} grad padded", jax.grad(loss), (params, xs, lengths),
             [(params, None), (xs, split), (lengths, P("batch"))], line)
        case(f"{kind} vmap grad", jax.vmap(jax.grad(loss), (None, 0)), (params, jnp.stack([xs, -xs])),
             [(params, None), (jnp.stack([xs, -xs]), P(None, None, "batch"))], line)
        tangent = jax.tree.map(jnp.ones_like, params)
        case(f"{kind} jvp", lambda p, x, loss=loss: jax.jvp(lambda p: loss(p, x), (p,), (tangent,)), (params, xs),
             [(params, None), (xs, split)], line)
        case(f"{kind} grad, batch over one axis of a 2x2 mesh", jax.grad(loss), (params, xs),
             [(params, None), (xs, P(None, "data"))], grid)
        case(f"{kind} grad, batch over both axes of a 2x2 mesh", jax.grad(loss), (params, xs),
             [(params, None), (xs, P(None, ("data", "model")))], grid)
        with jax.set_mesh(line):
            ys = jax.jit(lambda p, x, cell=cell: rnnlab.scan(cell, p, x)[0])(params, jax.device_put(xs, split))
            results[f"{kind} output spec"] = [str(axis) for axis in jax.typeof(ys).sharding.spec]

    for name, model, apply in [
        ("ManyToOne LSTM remat", models.ManyToOne(rnnlab.LSTM(32), 3, remat=5), lambda m, p, x: m(p, x)),
        ("ManyToMany Stack GRU LSTM", models.ManyToMany(rnnlab.Stack([rnnlab.GRU(16), rnnlab.LSTM(16)]), 3),
         lambda m, p, x: m(p, x)[0]),
        ("ManyToOne user IndRNN", models.ManyToOne(IndRNN(16), 3), lambda m, p, x: m(p, x)),
        ("ManyToOne RNN unroll 4", models.ManyToOne(rnnlab.RNN(16), 3, unroll=4), lambda m, p, x: m(p, x)),
    ]:
        params = model.init(jax.random.key(0), 8)
        case(name, jax.grad(lambda p, x, model=model, apply=apply: jnp.mean(apply(model, p, x) ** 2)), (params, xs),
             [(params, None), (xs, split)], line)
    seq2seq = models.Seq2Seq(rnnlab.GRU(32), rnnlab.GRU(32), 11, 13, 8)
    params = seq2seq.init(jax.random.key(0))
    src = jax.random.randint(jax.random.key(1), (7, 32), 0, 11)
    tgt = jax.random.randint(jax.random.key(2), (5, 32), 0, 13)
    src_lengths = jnp.arange(32) % 7 + 1
    case("Seq2Seq grad", jax.grad(lambda p, s, t, n: jnp.mean(seq2seq(p, s, t, src_lengths=n) ** 2)),
         (params, src, tgt, src_lengths), [(params, P()), (src, split), (tgt, split), (src_lengths, P("batch"))], line)
    case("Seq2Seq decode", lambda p, s: seq2seq.decode(p, s, 6), (params, src), [(params, P()), (src, split)], line)
    pathlib.Path(out).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def on_devices(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("explicit") / "results.json"
    env = {name: value for name, value in os.environ.items() if name != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}".strip())
    completed = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                               timeout=400, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["devices"] == DEVICES
    return results


def _cases(results: dict) -> dict:
    return {name: value for name, value in results.items() if isinstance(value, dict)}


def test_explicit_mode_computes_the_numbers_of_one_device(on_devices):
    cases = _cases(on_devices)
    assert len(cases) == 3 * 6 + 4 + 2
    for name, figures in cases.items():
        assert figures["error"] < 1e-5, (name, figures)


def test_explicit_mode_never_gathers_the_split_batch(on_devices):
    gathered = [name for name, figures in _cases(on_devices).items() if figures["gathers"]]
    assert not gathered


def test_explicit_mode_runs_the_kernels_on_each_devices_rows_and_keeps_the_outputs_split(on_devices):
    if on_devices["kernels"]:
        for kind in ("LSTM", "GRU", "RNN"):  # 32 rows over 4 devices, over the 2 of one axis of a 2x2 mesh
            assert _cases(on_devices)[f"{kind} grad"]["kernel_rows"] == [8]
            assert _cases(on_devices)[f"{kind} grad, batch over one axis of a 2x2 mesh"]["kernel_rows"] == [16]
    for kind in ("LSTM", "GRU", "RNN"):
        assert on_devices[f"{kind} output spec"] == ["None", "batch", "None"]


if __name__ == "__main__":
    _child(sys.argv[1])
