"""`rnnlab.scan` with the batch split over 4 devices in traced code: in `jax.sharding`'s explicit mode, and within
`rnnlab.native.split_batch`. Either way: the numbers of one device, nothing gathers the batch, the kernels run on
each device's rows.

**Explicit mode** (``jax.set_mesh`` over `AxisType.Explicit` axes, whose array types carry their sharding) types a
loop's carry and every op's sharding. Before, the built-in cells' kernels gathered a split batch and ran whole on
every device (their results typed replicated), a vmapped gradient failed on a reshape, a cell on the plain
`lax.scan` path (a user's cell, ``unroll`` > 1) failed (its carry of zeros was replicated where its steps returned it
split), and so did `Seq2Seq` (a token lookup with no result sharding given, a concatenation of a replicated and a
split block). Now the kernels run in `jax.shard_map` (`rnnlab.native.bind`), the initial carry is split as the
inputs are (`rnnlab.scan.prepare`; a carry leaf without the batch axes in front, a step count, is left whole), and
`Seq2Seq` splits its lookups as its tokens are.

**`split_batch(mesh, axis)`** (JAX's default, auto mode: what `rnnlab.train` uses) binds the kernels in
`jax.shard_map` along ``axis`` instead of leaving them to `custom_partitioning`. Checked for every cell, padded,
vmapped, to second order, on a 2x2 mesh, with a batch that does not divide (left as it is), inside a user's
`shard_map`, and for jit's cache: a function traced within and called outside (or the other way) is traced afresh.
Lowered for CUDA, either split gives each device the Pallas kernels on its own rows (this project is lent one GPU
at a time, so that is where several are checked).

**A sweep** splits its configurations over a mesh of its own: within a caller's ``jax.set_mesh`` (auto axes) it
failed, the context mesh not being the one its `shard_map` names; now the same numbers, and a clear error within a
mesh of explicit axes. **Training** splits its batch over a caller's mesh of auto axes (all its axes, its devices),
else over a mesh of its own; within explicit axes it is refused with a clear error (before, JAX failed mid-step
within any mesh but its own).

**Gradient norms** (`rnnlab.gradflow.grad_norms`) of a batch split over devices, in either mode: each device runs the
gradient-flow kernel on its own sequences and the norms are combined at the end (the squared norms add); before, the
batch was gathered and measured whole on every device.

A process fixes its device count when JAX starts, so the cases run in one fresh process with 4 virtual CPU devices
(this file as a script); each case's reference is the same function on unsplit inputs in that process (one device).
"""

import json
import os
import pathlib
import re
import subprocess
import sys
from unittest import mock

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 4
CELLS = ("LSTM", "GRU", "RNN")


def _child(out: str) -> None:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import rnnlab
    from rnnlab import models, native

    sys.path.insert(0, str(ROOT / "tests"))
    import pallas_lowering
    from user_cell import IndRNN

    @dataclasses.dataclass(frozen=True)
    class CountingIndRNN(IndRNN):
        """IndRNN whose carry also counts its steps: a carry leaf without the batch axes."""

        def initial_carry(self, batch_shape=(), dtype=jnp.float32):
            return super().initial_carry(batch_shape, dtype), jnp.zeros((), dtype)

        def __call__(self, params, carry, x):
            h, count = carry
            h, y = super().__call__(params, h, x)
            return (h, count + 1), y + count

    xs = jax.random.normal(jax.random.key(1), (30, 32, 8))
    lengths = jnp.arange(32) % 30 + 1
    results = {"devices": len(jax.devices()), "kernels": native.available()}

    def relative_error(got, want):
        pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        assert pairs and all(np.shape(a) == np.shape(b) for a, b in pairs)
        return max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) for a, b in pairs)

    def record(name, got, want, lowered):
        compiled = lowered.compile().as_text()
        kernels = [line for line in compiled.splitlines() if 'custom_call_target="rnnlab' in line]
        results[name] = {"error": relative_error(got, want), "gathers": "all-gather" in compiled,
                         "partitioner": "CustomSPMDPartitioning" in lowered.as_text(),
                         "kernel_rows": sorted({int(rows) for line in kernels
                                                for rows in re.findall(r"f32\[30,(\d+),", line)})}

    def case(name, function, args, specs, mesh):
        """Explicit mode: ``function(*args)`` on one device against the same within ``jax.set_mesh(mesh)``, each
        argument put there with its spec in ``specs``."""
        want = jax.jit(function)(*args)
        with jax.set_mesh(mesh):
            split_args = [jax.device_put(a, spec) for a, spec in zip(args, specs)]
            record(name, jax.jit(function)(*split_args), want, jax.jit(function).lower(*split_args))

    def split_case(name, function, args, specs, mesh, axis="batch"):
        """Auto mode: ``function(*args)`` on one device against the same traced within ``split_batch(mesh,
        axis)``, each argument put on ``mesh`` with its spec in ``specs``."""
        want = jax.jit(function)(*args)
        split_args = [jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in zip(args, specs)]
        with native.split_batch(mesh, axis):
            record(name, jax.jit(function)(*split_args), want, jax.jit(function).lower(*split_args))

    line = jax.make_mesh((DEVICES,), ("batch",), axis_types=(AxisType.Explicit,))
    grid = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    auto_line = Mesh(np.asarray(jax.devices()), ("batch",))
    auto_grid = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "model"))
    split, whole = P(None, "batch"), P()
    for cell in (rnnlab.LSTM(64), rnnlab.GRU(24), rnnlab.RNN(50, activation="relu")):
        kind = type(cell).__name__
        params = cell.init(jax.random.key(0), 8)
        tangent = jax.tree.map(jnp.ones_like, params)
        stacked = jnp.stack([xs, -xs])

        def loss(p, x, lengths=None, cell=cell):
            return jnp.mean(rnnlab.scan(cell, p, x, lengths=lengths)[0] ** 2)

        # Nothing differentiates it: the LSTM runs `lstm_infer_p`, the GRU `gru_forward_inputs_p`.
        def forward(p, x, cell=cell):
            return rnnlab.scan(cell, p, x)

        def jvp(p, x, loss=loss, tangent=tangent):
            return jax.jvp(lambda p: loss(p, x), (p,), (tangent,))

        def hvp(p, x, loss=loss, tangent=tangent):
            return jax.jvp(lambda p: jax.grad(loss)(p, x), (p,), (tangent,))[1]

        for prefix, run, meshes in (("", case, (line, grid)), ("split_batch ", split_case, (auto_line, auto_grid))):
            run(f"{prefix}{kind} grad", jax.grad(loss), (params, xs), (whole, split), meshes[0])
            run(f"{prefix}{kind} forward", forward, (params, xs), (whole, split), meshes[0])
            run(f"{prefix}{kind} grad padded", jax.grad(loss), (params, xs, lengths), (whole, split, P("batch")),
                meshes[0])
            run(f"{prefix}{kind} vmap grad", jax.vmap(jax.grad(loss), (None, 0)), (params, stacked),
                (whole, P(None, None, "batch")), meshes[0])
            run(f"{prefix}{kind} jvp", jvp, (params, xs), (whole, split), meshes[0])
            run(f"{prefix}{kind} hvp", hvp, (params, xs), (whole, split), meshes[0])
        case(f"{kind} grad, batch over one axis of a 2x2 mesh", jax.grad(loss), (params, xs), (whole, P(None, "data")),
             grid)
        case(f"{kind} grad, batch over both axes of a 2x2 mesh", jax.grad(loss), (params, xs),
             (whole, P(None, ("data", "model"))), grid)
        split_case(f"split_batch {kind} grad, batch over one axis of a 2x2 mesh", jax.grad(loss), (params, xs),
                   (whole, P(None, "data")), auto_grid, "data")
        split_case(f"split_batch {kind} grad, batch over both axes of a 2x2 mesh", jax.grad(loss), (params, xs),
                   (whole, P(None, ("data", "model"))), auto_grid, ("data", "model"))
        with jax.set_mesh(line):
            ys = jax.jit(lambda p, x, cell=cell: rnnlab.scan(cell, p, x)[0])(params, jax.device_put(xs, split))
            results[f"{kind} output spec"] = [str(axis) for axis in jax.typeof(ys).sharding.spec]

    for name, model, apply in [
        ("ManyToOne LSTM remat", models.ManyToOne(rnnlab.LSTM(32), 3, remat=5), lambda m, p, x: m(p, x)),
        ("ManyToMany Stack GRU LSTM", models.ManyToMany(rnnlab.Stack([rnnlab.GRU(16), rnnlab.LSTM(16)]), 3),
         lambda m, p, x: m(p, x)[0]),
        ("ManyToOne user IndRNN", models.ManyToOne(IndRNN(16), 3), lambda m, p, x: m(p, x)),
        ("ManyToMany user IndRNN counting its steps", models.ManyToMany(CountingIndRNN(16), 3),
         lambda m, p, x: m(p, x)[0]),
        ("ManyToOne RNN unroll 4", models.ManyToOne(rnnlab.RNN(16), 3, unroll=4), lambda m, p, x: m(p, x)),
    ]:
        params = model.init(jax.random.key(0), 8)
        case(name, jax.grad(lambda p, x, model=model, apply=apply: jnp.mean(apply(model, p, x) ** 2)), (params, xs),
             (whole, split), line)
    seq2seq = models.Seq2Seq(rnnlab.GRU(32), rnnlab.GRU(32), 11, 13, 8)
    params = seq2seq.init(jax.random.key(0))
    src = jax.random.randint(jax.random.key(1), (7, 32), 0, 11)
    tgt = jax.random.randint(jax.random.key(2), (5, 32), 0, 13)
    src_lengths = jnp.arange(32) % 7 + 1
    case("Seq2Seq grad", jax.grad(lambda p, s, t, n: jnp.mean(seq2seq(p, s, t, src_lengths=n) ** 2)),
         (params, src, tgt, src_lengths), (whole, split, split, P("batch")), line)
    case("Seq2Seq decode", lambda p, s: seq2seq.decode(p, s, 6), (params, src), (whole, split), line)

    # Gradient norms over a split batch: each device measures its own sequences, the norms combined.
    from rnnlab import gradflow

    def norms_case(name, function, args, specs, mesh, within=None):
        """``function(*args)`` (log10 norms) on ``mesh`` (explicit mode, or auto within ``split_batch(mesh,
        within)``) against the XLA engine on one device (the kernels off): the largest difference where both are
        finite, whether their -inf and nan are at the same steps, whether the program gathers, and the
        gradient-flow kernel's rows a device."""
        with mock.patch.dict(os.environ, RNNLAB_NATIVE="0"):  # read while tracing: the XLA engine
            want = np.asarray(jax.jit(function)(*args))
        if within is None:
            with jax.set_mesh(mesh):
                split_args = [jax.device_put(a, spec) for a, spec in zip(args, specs)]
                got, lowered = jax.jit(function)(*split_args), jax.jit(function).lower(*split_args)
        else:
            split_args = [jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in zip(args, specs)]
            with native.split_batch(mesh, within):
                got, lowered = jax.jit(function)(*split_args), jax.jit(function).lower(*split_args)
        got, compiled = np.asarray(got), lowered.compile().as_text()
        finite = np.isfinite(want) & np.isfinite(got)
        kernels = [line for line in compiled.splitlines() if 'custom_call_target="rnnlab_gradflow' in line]
        results[name] = {"difference": float(np.max(np.abs(got - want), where=finite, initial=0.0)),
                         "finite steps": int(finite.sum()), "steps": int(want.size),
                         "same -inf and nan": bool(np.array_equal(np.isneginf(got), np.isneginf(want))
                                                   and np.array_equal(np.isnan(got), np.isnan(want))),
                         "-inf and nan": [int(np.isneginf(want).sum()), int(np.isnan(want).sum())],
                         "gathers": "all-gather" in compiled,
                         "direct": 'custom_call_target="rnnlab_gradflow_direct"' in compiled,
                         "kernel_rows": sorted({int(rows) for line in kernels
                                                for rows in re.findall(r"f32\[30,1,(\d+),8\]", line)})}

    for cell in (rnnlab.LSTM(64), rnnlab.GRU(24), rnnlab.RNN(50, activation="relu")):
        kind, params = type(cell).__name__, cell.init(jax.random.key(0), 8)
        norms = lambda p, x, cell=cell: gradflow.grad_norms(cell, p, x)  # noqa: E731
        norms_case(f"norms {kind}", norms, (params, xs), (whole, split), line)
        norms_case(f"norms {kind} remat", lambda p, x, cell=cell: gradflow.grad_norms(cell, p, x, remat=5),
                   (params, xs), (whole, split), line)
        norms_case(f"norms {kind}, batch over both axes of a 2x2 mesh", norms, (params, xs),
                   (whole, P(None, ("data", "model"))), grid)
        norms_case(f"norms {kind}, split_batch", norms, (params, xs), (whole, split), auto_line, "batch")
    cell = rnnlab.RNN(50, activation="relu")
    params = {**cell.init(jax.random.key(0), 8), "b": jnp.zeros((50,))}
    norms = lambda p, x: gradflow.grad_norms(cell, p, x)  # noqa: E731
    # The first device's 8 sequences stay at zero (no input, no bias), so its norms are all -inf (exactly zero);
    # with a nan in one sequence every step is nan; with the recurrent weights zero, every step before the last -inf.
    norms_case("norms, one device's rows all zero", norms, (params, xs.at[:, :8].set(0.0)), (whole, split), line)
    norms_case("norms, a nan in one sequence", norms, (params, xs.at[12, 20, 3].set(jnp.nan)), (whole, split), line)
    norms_case("norms, W_h zero", norms, ({**params, "w_h": jnp.zeros_like(params["w_h"])}, xs), (whole, split),
               line)
    norms_case("norms, split_batch, batch of 6 over 4 devices", norms, (params, xs[:, :6]), (whole, P()), auto_line,
               "batch")
    norms_case("norms, a loss of the user's",
               lambda p, x: gradflow.grad_norms(cell, p, x, loss=lambda hs: jnp.sum(hs[-1] ** 2)), (params, xs),
               (whole, split), line)

    # split_batch, where it must leave the primitives as they are, and jit's cache.
    cell = rnnlab.LSTM(64)
    params = cell.init(jax.random.key(0), 8)

    def loss(p, x):
        return jnp.mean(rnnlab.scan(cell, p, x)[0] ** 2)

    split_case("split_batch batch of 6 over 4 devices", jax.grad(loss), (params, xs[:, :6]), (whole, P()),
               auto_line)
    split_case("split_batch around a user's shard_map",
               jax.shard_map(lambda p, x: jax.lax.pmean(jax.grad(loss)(p, x), "batch"), mesh=auto_line,
                             in_specs=(whole, split), out_specs=whole, check_vma=False), (params, xs), (whole, split),
               auto_line)
    # jit's trace cache is per function: each scenario jits its own.
    want = jax.jit(loss)(params, xs)

    def traced_within(p, x):
        return loss(p, x)

    once = jax.jit(traced_within)
    with native.split_batch(Mesh(np.asarray(jax.devices()[:2]), ("batch",)), "batch"):
        within = once(params, xs)
    device = jax.devices()[3]
    try:  # must be traced afresh: a trace holding a shard_map over devices 0 and 1 cannot run on device 3
        outside = once(jax.device_put(params, device), jax.device_put(xs, device))
        error = max(relative_error(within, want), relative_error(outside, want))
    except ValueError as failure:
        error = str(failure)
    results["split_batch traced within, called outside"] = {"error": error}

    def traced_outside(p, x):
        return loss(p, x)

    before = jax.jit(traced_outside)
    before(params, xs)
    with native.split_batch(auto_line, "batch"):  # must be traced afresh, with the split
        results["split_batch traced outside, called within: shard_map"] = "shard_map" in str(
            jax.make_jaxpr(before)(params, xs))
    # Lowered for a GPU (CUDA; no GPU needed): within a split, each device runs the Pallas kernels on its own rows
    # (8, padded to a program's 16), as on one GPU; a plain jit over a split batch keeps XLA's loops, the kernels
    # being opaque to XLA's partitioner.
    def triton_calls(function, args):
        if not pallas_lowering.lowers_for_cuda_here():
            return pallas_lowering.REASON
        text = function.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        calls = [line for line in text.splitlines() if "xla.gpu.triton" in line]
        return [len(calls), sorted({int(rows) for line in calls for rows in re.findall(r"tensor<30x(\d+)x", line)}),
                sorted({int(members) for line in calls for members in re.findall(r"grid_x = (\d+)", line)})]

    for name, cell, extra in (("LSTM", rnnlab.LSTM(64), ()), ("LSTM padded", rnnlab.LSTM(64), (lengths,)),
                              ("GRU", rnnlab.GRU(32), ()), ("RNN", rnnlab.RNN(128), ()),
                              ("LSTM team", rnnlab.LSTM(128), ())):
        params = cell.init(jax.random.key(0), 8)
        grad = jax.jit(jax.grad(lambda p, x, n=None, cell=cell: jnp.mean(rnnlab.scan(cell, p, x, lengths=n)[0] ** 2)))
        with jax.set_mesh(line):
            args = [jax.device_put(a, spec) for a, spec in zip((params, xs, *extra), (whole, split, P("batch")))]
            results[f"cuda explicit {name}"] = triton_calls(grad, args)
        args = [jax.device_put(a, NamedSharding(auto_line, spec))
                for a, spec in zip((params, xs, *extra), (whole, split, P("batch")))]
        with native.split_batch(auto_line, "batch"):
            results[f"cuda split_batch {name}"] = triton_calls(grad, args)
        results[f"cuda plain jit {name}"] = triton_calls(jax.jit(grad), args)
    # A sweep splits its work over a mesh of its own: within a caller's mesh context of auto axes the same numbers,
    # within explicit axes a clear error. Training splits its batch over the caller's mesh of auto axes (all its
    # axes, its devices), else over its own; within explicit axes a clear error.
    from rnnlab import sweep, tasks, train

    def table():
        return np.asarray(sweep.grad_norm_table(sweep.make_cell("lstm", 16), sweep.Grid.product([0.5, 1.0], [0, 1]),
                                                20, input_size=3, batch=4)[0])

    @dataclasses.dataclass(frozen=True)
    class Watched(models.ManyToOne):
        """ManyToOne noting, as each use of its inputs ``[T, B, I]`` is compiled, the devices holding them and
        their rows on each."""

        splits: list = dataclasses.field(default_factory=list, compare=False, hash=False)

        def __call__(self, params, xs, *args, **kwargs):
            jax.debug.inspect_array_sharding(xs, callback=lambda sharding: self.splits.append(
                [len(sharding.device_set), sharding.shard_shape(xs.shape)[1]]))
            return super().__call__(params, xs, *args, **kwargs)

    def losses(**options):
        task, model, meshes = tasks.AddingProblem(10), Watched(rnnlab.LSTM(16), 1), []

        def callback(step, p):  # where the parameters are after each step (on one device: no mesh)
            mesh = getattr(jax.tree.leaves(p)[0].sharding, "mesh", None)
            meshes.append(None if mesh is None else dict(mesh.shape))

        run = train.train_on_task(task, model, seed=0, steps=2, batch_size=8, learning_rate=1e-2, test_size=8,
                                  eval_every=2, progress=False, callback=callback, **options)
        return np.asarray(run.history["loss"]), {"params on": meshes[-1], "splits": model.splits}

    pair = Mesh(np.asarray(jax.devices()[2:]), ("data",))
    one_device = losses(batch_axes=None)[0]  # training's reference: the batch whole on one device
    for name, run, alone, accepted, refused in (
            ("sweep", lambda: (table(), None), table(), [auto_grid], line),  # its reference: its own mesh
            ("train", losses, one_device, [auto_line, auto_grid, pair], line)):
        for mesh in accepted:
            with jax.set_mesh(mesh):
                numbers, where = run()
            results[f"{name} within {dict(mesh.shape)}"] = {"error": relative_error(numbers, alone), **(where or {})}
        try:
            with jax.set_mesh(refused):
                run()
            results[f"{name} within a refused mesh"] = "no error"
        except ValueError as failure:
            results[f"{name} within a refused mesh"] = str(failure)
    # Within an abstract mesh alone (split_batch sets one): train's own mesh runs, another is refused.
    with native.split_batch(auto_line, "batch"):
        results["train within split_batch of its own mesh"] = {"error": relative_error(losses()[0], one_device)}
    try:
        with native.split_batch(pair, "data"):
            losses()
        results["train within split_batch of another mesh"] = "no error"
    except ValueError as failure:
        results["train within split_batch of another mesh"] = str(failure)
    pathlib.Path(out).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def on_devices(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharded") / "results.json"
    env = {name: value for name, value in os.environ.items() if name != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}".strip())
    completed = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                               timeout=500, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["devices"] == DEVICES
    return results


def _cases(results: dict, split_batch: bool) -> dict:
    return {name: value for name, value in results.items()
            if isinstance(value, dict) and "error" in value and "gathers" in value
            and name.startswith("split_batch") == split_batch}


@pytest.mark.parametrize("split_batch, count", [(False, 3 * 8 + 5 + 2), (True, 3 * 8 + 2)])
def test_the_numbers_of_one_device(on_devices, split_batch, count):
    cases = _cases(on_devices, split_batch)
    assert len(cases) == count
    for name, figures in cases.items():
        assert figures["error"] < 1e-5, (name, figures)


@pytest.mark.parametrize("split_batch", [False, True])
def test_nothing_gathers_the_split_batch(on_devices, split_batch):
    gathered = [name for name, figures in _cases(on_devices, split_batch).items() if figures["gathers"]]
    assert not gathered


def test_the_kernels_run_on_each_devices_rows_and_the_outputs_stay_split(on_devices):
    cases = {**_cases(on_devices, False), **_cases(on_devices, True)}
    if on_devices["kernels"]:
        for kind in CELLS:  # 32 rows over 4 devices; over the 2 of one axis of a 2x2 mesh
            for prefix in ("", "split_batch "):
                for use in ("grad", "forward"):
                    assert cases[f"{prefix}{kind} {use}"]["kernel_rows"] == [8]
                assert cases[f"{prefix}{kind} grad, batch over one axis of a 2x2 mesh"]["kernel_rows"] == [16]
                assert cases[f"{prefix}{kind} grad, batch over both axes of a 2x2 mesh"]["kernel_rows"] == [8]
    for kind in CELLS:
        assert on_devices[f"{kind} output spec"] == ["None", "batch", "None"]


def test_split_batch_leaves_custom_partitioning_behind(on_devices):
    cases = _cases(on_devices, True)
    for kind in CELLS:
        assert not cases[f"split_batch {kind} grad"]["partitioner"]
    # A batch that does not divide is left to the partitioner; in a user's shard_map each device has its own rows.
    assert cases["split_batch batch of 6 over 4 devices"]["partitioner"]
    assert not cases["split_batch around a user's shard_map"]["partitioner"]


def test_a_function_traced_within_split_batch_is_traced_afresh_outside(on_devices):
    error = on_devices["split_batch traced within, called outside"]["error"]
    assert isinstance(error, float) and error < 1e-5, error


def test_a_function_traced_outside_split_batch_is_traced_afresh_within(on_devices):
    assert on_devices["split_batch traced outside, called within: shard_map"] is True


def test_on_several_gpus_each_device_would_run_the_pallas_kernels_on_its_rows(on_devices):
    """This project is lent one GPU at a time, so the split on several is checked in the CUDA lowering: in explicit
    mode and within `split_batch`, two Triton calls (forward and backward) on each device's 8 rows padded to 16,
    one program per 16 rows, or a team of 4 for the LSTM at hidden 128 (`native.pallas.team_size`); a plain jit over
    the split batch keeps XLA's loops (`native._several_devices`)."""
    if isinstance(on_devices["cuda explicit LSTM"], str):
        pytest.skip(on_devices["cuda explicit LSTM"])
    for name in ("LSTM", "LSTM padded", "GRU", "RNN", "LSTM team"):
        expected = [2, [16], [4 if name == "LSTM team" else 1]]
        assert on_devices[f"cuda explicit {name}"] == on_devices[f"cuda split_batch {name}"] == expected, name
        assert on_devices[f"cuda plain jit {name}"] == [0, [], []], name


def test_a_sweep_keeps_its_own_mesh_within_a_callers(on_devices):
    assert on_devices["sweep within {'data': 2, 'model': 2}"]["error"] < 1e-6  # auto axes
    assert "explicit axes" in on_devices["sweep within a refused mesh"]


def test_training_splits_its_batch_over_a_callers_mesh_of_auto_axes(on_devices):
    """Within the caller's mesh: the same losses as with the batch whole on one device, the parameters on the
    caller's mesh, and each step's batch of 8 split over all of its devices: all 4 on one axis or on a 2x2
    grid (2 rows each), or 2 of the 4 (4 rows each)."""
    for shape, split in (({"batch": 4}, [4, 2]), ({"data": 2, "model": 2}, [4, 2]), ({"data": 2}, [2, 4])):
        figures = on_devices[f"train within {shape}"]
        assert figures["error"] < 1e-6 and figures["params on"] == shape, (shape, figures)
        assert split in figures["splits"], (shape, figures)
    assert "explicit axes" in on_devices["train within a refused mesh"]
    # Within an abstract mesh alone (as `split_batch` sets): its own mesh runs, another is refused.
    assert on_devices["train within split_batch of its own mesh"]["error"] < 1e-6
    assert "abstract mesh" in on_devices["train within split_batch of another mesh"]


def _norms_cases(results: dict) -> dict:
    return {name: value for name, value in results.items() if name.startswith("norms")}


def test_gradient_norms_of_a_split_batch_are_those_of_one_device(on_devices):
    """Every step's log10 norm as on one device (float32 rounding of the combination), its -inf and nan at the same
    steps: one device's rows all zero (its own norms -inf) changes nothing, a nan in one device's sequence makes
    every step nan, zero recurrent weights leave every step but the last -inf on every device."""
    cases = _norms_cases(on_devices)
    assert len(cases) == 4 * 3 + 5
    for name, figures in cases.items():
        assert figures["same -inf and nan"] and figures["difference"] < 1e-5, (name, figures)
        assert figures["finite steps"] == figures["steps"] - sum(figures["-inf and nan"]), (name, figures)
    assert cases["norms, one device's rows all zero"]["-inf and nan"] == [0, 0]
    assert cases["norms, a nan in one sequence"]["-inf and nan"] == [0, 30]
    assert cases["norms, W_h zero"]["-inf and nan"] == [29, 0]


def test_gradient_norms_of_a_split_batch_run_on_each_devices_rows(on_devices):
    """Each device runs the gradient-flow kernel on its own 8 of the 32 sequences and nothing gathers them (before:
    the whole batch on every device); a batch of 6 over 4 devices is measured whole; a loss of the user's runs in
    the kernel for such losses (`gradflow_direct_p`), which takes the whole batch on every device (not split)."""
    cases = _norms_cases(on_devices)
    for name, figures in cases.items():
        if "batch of 6" not in name and "user's" not in name:
            assert not figures["gathers"], (name, figures)
            if on_devices["kernels"]:
                assert figures["kernel_rows"] == [8], (name, figures)
    if on_devices["kernels"]:
        assert cases["norms, split_batch, batch of 6 over 4 devices"]["kernel_rows"] == [6]
    user = cases["norms, a loss of the user's"]
    if on_devices["kernels"]:
        assert user["direct"] and user["kernel_rows"] == [32], user
    else:
        assert not user["direct"] and user["kernel_rows"] == [], user


def test_split_batch_names_a_bad_axis():
    import jax
    import numpy as np
    from jax.sharding import Mesh

    import rnnlab

    mesh = Mesh(np.asarray(jax.devices()[:1]), ("batch",))
    for axis in ("data", ("batch", "data"), (), ("batch", "batch")):
        with pytest.raises(ValueError, match="split_batch: axis .* is not one of the mesh's axes"):
            with rnnlab.split_batch(mesh, axis):
                pass


if __name__ == "__main__":
    _child(sys.argv[1])
