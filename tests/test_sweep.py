"""`rnnlab.sweep`, `rnnlab.results` and experiments/gradient_flow.py: records equal direct measurements, sharded
equals unsharded, failures are recorded, interrupted runs resume without losing or duplicating rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import rnnlab
from rnnlab import gradflow, results, sweep

ROOT = Path(__file__).parents[1]
SMALL = dict(hidden_size=6, input_size=3, batch=2)


def test_records_equal_direct_measurement_of_each_configuration():
    table = sweep.gradient_flow(["lstm"], [0.5, 1.5], 2, [7], **SMALL)
    assert len(table["t"]) == 2 * 2 * 7
    for gain, seed in [(0.5, 0), (1.5, 1)]:
        cell = rnnlab.LSTM(6)
        params = cell.init(jax.random.PRNGKey(seed), 3)
        params = {**params, "w_h": params["w_h"] * gain}
        xs = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), 1), (7, 2, 3))
        rows = (table["gain"] == np.float32(gain)) & (table["seed"] == seed)
        np.testing.assert_allclose(table["log10_grad_norm"][rows], gradflow.grad_norms(cell, params, xs), rtol=1e-5)
        np.testing.assert_array_equal(table["lag"][rows], 6 - np.arange(7))


def test_gain_scales_every_recurrent_block():
    cell = rnnlab.LSTM(8)
    params = sweep.scale_recurrent(cell, cell.init(jax.random.PRNGKey(0), 3), 1.7)
    for block in np.split(np.asarray(params["w_h"]), 4, axis=1):
        np.testing.assert_allclose(np.linalg.svd(block, compute_uv=False), 1.7, rtol=1e-5)


def test_fit_rate_and_summary_on_known_lines():
    lags = np.arange(50)[::-1]
    assert sweep.fit_rate(lags, 3.0 - 0.25 * lags) == pytest.approx(-0.25)
    table = {
        "cell": np.repeat(["a"], 100), "seq_len": np.full(100, 50), "gain": np.full(100, 2.0),
        "seed": np.repeat([0, 1], 50), "t": np.tile(np.arange(50), 2), "lag": np.tile(lags, 2),
        "log10_grad_norm": np.concatenate([-0.1 * lags, -0.3 * lags]), "theory_rate": np.full(100, -0.2),
    }
    (row,) = sweep.summarize(table)
    assert row["rate_mean"] == pytest.approx(-0.2) and row["rate_std"] == pytest.approx(0.1)
    assert row["steps_to_1e-6"] == pytest.approx(30.0)
    assert sweep.fit_rate(lags, np.where(lags > 40, -np.inf, -0.5 * lags)) == pytest.approx(-0.5)  # before it vanished
    assert np.isnan(sweep.fit_rate(lags, np.where(lags > 40, np.nan, -0.5 * lags)))  # overflowed: no rate
    longer = [{**row, "seq_len": 100, "rate_mean": float("nan")}, {**row, "gain": 3.0}]
    assert [(r["gain"], r["seq_len"]) for r in sweep.headline([row, *longer])] == [(2.0, 50), (3.0, 50)]


def test_user_cell_by_module_path_and_failing_cell_recorded(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))

    class Broken:  # follows the protocol but fails inside the step
        def init(self, key, input_size):
            return {"w_h": jax.numpy.ones((2, 2))}

        def initial_carry(self, batch_shape=(), dtype=np.float32):
            return jax.numpy.zeros((*batch_shape, 3))

        def __call__(self, params, carry, x):
            return carry @ params["w_h"], carry  # shape mismatch: 3 vs 2

        def hidden(self, carry):
            return carry

    table = sweep.gradient_flow({"indrnn": "user_cell:IndRNN", "broken": Broken(), "gru": "gru"}, [1.0], 1, [5],
                                **SMALL)
    for name in ("indrnn", "gru"):
        rows = table["cell"] == name
        assert rows.sum() == 5 and np.all(table["finite"][rows]) and np.all(table["error"][rows] == "")
    broken = table["cell"] == "broken"
    assert broken.sum() == 5 and not np.any(table["finite"][broken])
    assert "TypeError" in table["error"][broken][0] or "ValueError" in table["error"][broken][0]


def test_overflowing_configuration_recorded_as_non_finite():
    table = sweep.gradient_flow(["irnn"], [1.0, 3.0], 1, [120], **SMALL)
    exploded = table["gain"] == np.float32(3.0)
    assert not np.any(table["finite"][exploded]) and np.all(table["finite"][~exploded])


def test_sharded_over_four_devices_equals_one_device(tmp_path):
    script = (
        "import sys, numpy as np, jax; from rnnlab import sweep\n"
        "assert len(jax.devices()) == 4, jax.devices()\n"
        "t = sweep.gradient_flow(['gru'], [0.5, 1.0, 2.0], 2, [9], hidden_size=6, input_size=3, batch=2)\n"
        "np.savez(sys.argv[1], **t)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "sharded.npz")], check=True, env=env, cwd=ROOT)
    sharded = np.load(tmp_path / "sharded.npz", allow_pickle=False)
    single = sweep.gradient_flow(["gru"], [0.5, 1.0, 2.0], 2, [9], **SMALL)  # 6 configurations, padded to 8
    for column in sweep.COLUMNS:
        if single[column].dtype.kind == "f":
            np.testing.assert_allclose(sharded[column], single[column], rtol=1e-5)
        else:
            np.testing.assert_array_equal(sharded[column], single[column])


def test_interrupted_sweep_resumes_without_recomputing_or_duplicating(tmp_path, monkeypatch):
    args = (["rnn_tanh", "lstm"], [0.5, 1.5], 2, [5, 8])
    uninterrupted = sweep.gradient_flow(*args, **SMALL)

    class Interrupt(Exception):
        pass

    def stop_after_three(units):
        for done, unit in enumerate(units):
            if done == 3:
                raise Interrupt
            yield unit

    run = results.RunFolder(tmp_path / "run")
    with pytest.raises(Interrupt):
        sweep.gradient_flow(*args, run=run, progress=stop_after_three, **SMALL)
    assert len(run.done()) == 3
    measured = []
    original = sweep.measure
    monkeypatch.setattr(sweep, "measure", lambda *a, **k: measured.append(a[2]) or original(*a, **k))
    resumed = sweep.gradient_flow(*args, run=results.RunFolder(tmp_path / "run"), **SMALL)
    assert measured == [8]  # only the one unit left: (lstm, T=8)
    for column in sweep.COLUMNS:
        np.testing.assert_array_equal(resumed[column], uninterrupted[column])


def test_run_folder_refuses_a_different_config(tmp_path):
    run = results.RunFolder(tmp_path, {"gains": [1.0]})
    run.save("x", 1, table={"a": np.arange(3)})
    np.testing.assert_array_equal(results.RunFolder(tmp_path, {"gains": [1.0]}).load("x", 1)["a"], np.arange(3))
    with pytest.raises(ValueError, match="another --out"):
        results.RunFolder(tmp_path, {"gains": [2.0]})


def test_experiment_writes_everything_and_resumes(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "experiments/gradient_flow.py", "--cells=rnn_tanh,user_cell:IndRNN", "--gains=0.5,1.5",
               "--seeds=2", "--seq_lens=6,20", "--hidden_size=5", "--input_size=3", "--batch=2", f"--out={out}",
               "--max_points=10"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert "rnn_tanh" in first.stdout and "steps to 1e-6" in first.stdout
    for name in ("records.csv", "records.json", "summary.csv", "grad_vs_lag.png", "heatmap.png",
                 "rates_vs_gain.png", "first_step_vs_seq_len.png"):
        assert (out / name).stat().st_size > 0, name
    records = results.read_csv(out / "records.csv")
    assert len(records["t"]) == 2 * 2 * 2 * (6 + 10)  # cells × gains × seeds × (T=6 all steps + T=20 thinned to 10)
    meta = json.loads((out / "records.json").read_text())
    assert "gradient_flow.py" in meta["command"] and meta["versions"]["jax"] and meta["config"]["seeds"] == 2
    assert len(meta["devices"]) == os.cpu_count()  # the experiment shards its configurations over every core
    (out / "units" / "rnn_tanh__20.npz").unlink()  # as if killed before the last unit of rnn_tanh was saved
    subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    again = results.read_csv(out / "records.csv")
    for column, values in records.items():
        np.testing.assert_array_equal(again[column], values)


def test_vmapped_initialisation_of_gated_cells_does_not_hang():
    """Several batched QRs in one jitted program deadlocked JAX's CPU thread pool (an LSTM's four orthogonal gate
    blocks, vmapped over 48 configurations, at hidden size 128). A subprocess with a time limit catches a relapse."""
    script = (
        "import jax.numpy as jnp, rnnlab; from rnnlab import sweep\n"
        "grid = sweep.Grid.product([0.5, 0.8, 1.0, 1.2, 1.5, 2.0], range(8))\n"
        "params = sweep.init_configs(rnnlab.LSTM(128), jnp.asarray(grid.seeds), jnp.asarray(grid.gains), 32)\n"
        "assert params['w_h'].shape == (48, 128, 512)\n"
    )
    try:
        subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=240,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    except subprocess.TimeoutExpired:
        pytest.fail("vmapped LSTM/GRU initialisation did not finish in 240 s: the batched-QR deadlock is back")


def test_a_second_process_finds_every_sweep_program_in_the_persistent_cache(two_processes_cache):
    """On 2 devices (each measuring its own configurations, through the native kernel where it applies) a fresh
    process running the same sweep compiles nothing new: every program's persistent-cache key is the same in every
    process (a `custom_partitioning` callback in a program would change it)."""
    script = (
        "from rnnlab import sweep\n"
        "sweep.use_cpu_cores(2)\n"
        "grid = sweep.Grid.product([0.5, 1.0, 2.0], [0, 1])\n"
        "for name in ('lstm', 'rnn_tanh'):\n"
        "    sweep.grad_norm_table(sweep.make_cell(name, 32), grid, 30, input_size=3, batch=4)\n"
    )
    entries = two_processes_cache(script)
    assert any(name.startswith("jit_measure_configs") for name in entries[0])
    assert entries[1] == entries[0]


@pytest.mark.parametrize("name", ["lstm", "rnn_tanh"])
def test_other_gains_and_seeds_lower_no_new_program(name):
    """One program per cell and grid size: a second sweep with other gains and other seeds (as many of each) lowers
    nothing (JAX's lowering event fires on every jit cache miss, also where the persistent cache then holds the
    compiled program), and the theory rates come with it. Its numbers are the new configurations', not the first's."""
    cell = sweep.make_cell(name, 8)
    kwargs = dict(input_size=3, batch=2)
    first = sweep.measure(cell, sweep.Grid.product([0.5, 1.0], [0, 1]), 12, **kwargs)
    lowered = []

    def listen(event, seconds, **_):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        second = sweep.measure(cell, sweep.Grid.product([0.7, 1.9], [5, 11]), 12, **kwargs)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert lowered == []
    params = sweep.scale_recurrent(cell, cell.init(jax.random.PRNGKey(11), 3), np.float32(1.9))
    xs = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(11), 1), (12, 2, 3))
    np.testing.assert_allclose(second.log10_grad_norm[3], gradflow.grad_norms(cell, params, xs), rtol=1e-5,
                               atol=1e-5)
    assert not np.allclose(second.log10_grad_norm, first.log10_grad_norm)
