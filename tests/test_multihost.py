"""Several hosts: training and sweeps after `jax.distributed.initialize`, as two processes on this machine.

Each process sees one CPU device of its own and the two talk through JAX's CPU collectives (gloo), as two hosts
would over a network. Both run this file as a worker: `train.train_on_task` (its batch split over the two processes'
devices), `sweep.gradient_flow` (its configurations split over them). The reference is the
same calls in the test process, on one device: the numbers must agree to float32 summation order, and both
processes must hold the same whole results.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import rnnlab
from rnnlab import models, results, sweep, tasks, train

PROCESSES = 2
TASK = tasks.AddingProblem(seq_len=8)
MODEL = models.ManyToOne(rnnlab.LSTM(8), TASK.output_size)
GRID = sweep.Grid.product([0.5, 1.0, 1.5], [0, 1])  # 6 configurations: 3 per process


def computations() -> dict[str, np.ndarray]:
    """Everything compared, as flat arrays: training history and parameters, the sweep's norms and records."""
    result = train.train_on_task(TASK, MODEL, seed=0, steps=4, batch_size=8, learning_rate=1e-2, test_size=16,
                                 eval_every=2, progress=False)
    # `gradient_flow` measures through `grad_norm_table`: GRID's 6 configurations, 3 a process.
    records = sweep.gradient_flow(["lstm"], [0.5, 1.0, 1.5], 2, [12], hidden_size=8, input_size=3, batch=2)
    flat_params = np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(jax.device_get(result.params))])
    return {"loss": result.history["loss"], "grad_norm": result.history["grad_norm"],
            "test_loss": result.evals["test_loss"], "params": flat_params,
            "records": records["log10_grad_norm"], "theory": records["theory_rate"]}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def run_together(commands: list[list[str]]) -> None:
    """Start every command at once (CPU only, this machine's own devices), wait for all, and fail with the output of
    any that failed."""
    flags = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in flag)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for command in commands]
    try:
        outputs = [worker.communicate(timeout=280)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]


@pytest.mark.timeout(300)
def test_two_processes_give_the_numbers_of_one_device(tmp_path):
    port = _free_port()
    run_together([[sys.executable, __file__, str(port), str(process), str(tmp_path)] for process in range(PROCESSES)])
    got = [dict(np.load(tmp_path / f"process{process}.npz")) for process in range(PROCESSES)]
    for process, values in enumerate(got):
        assert (values["process_count"], values["global_devices"], values["local_devices"]) == (PROCESSES, 2, 1)
    # The batch and the configurations really were split: each process's shards, not the whole.
    assert got[0]["batch_shard"] == 4 and got[0]["config_shard"] == len(GRID) // PROCESSES

    expected = computations()
    for values in got:
        for name, want in expected.items():
            np.testing.assert_allclose(values[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow  # 45 s on 2 cores: the experiment script in three processes; the test above covers two hosts
@pytest.mark.timeout(300)
def test_gradient_flow_experiment_on_two_processes_writes_the_records_of_one(tmp_path):
    """`experiments/gradient_flow.py --coordinator=...` on two processes (each showing its 2 cores as devices: 4
    devices, one configuration each) writes, from process 0, the records a single process writes."""
    script = pathlib.Path(__file__).parents[1] / "experiments" / "gradient_flow.py"
    common = ["--cells=lstm,rnn_tanh", "--gains=0.5,1.5", "--seeds=2", "--seq_lens=10,20", "--hidden_size=8",
              "--input_size=3", "--batch=2", "--compilation_cache="]
    port = _free_port()
    run_together([[sys.executable, str(script), *common, f"--out={tmp_path / 'several'}",
                   f"--coordinator=localhost:{port}", f"--num_processes={PROCESSES}", f"--process_id={process}"]
                  for process in range(PROCESSES)])
    run_together([[sys.executable, str(script), *common, f"--out={tmp_path / 'one'}"]])
    devices = json.loads((tmp_path / "several" / "records.json").read_text())["devices"]
    assert len(devices) == 2 * PROCESSES  # every core of both processes
    several, one = (results.read_csv(tmp_path / name / "records.csv") for name in ("several", "one"))
    assert set(several) == set(one) and len(several["cell"]) == len(one["cell"]) == 2 * 2 * 2 * (10 + 20)
    for column in ("cell", "gain", "seed", "seq_len", "t"):
        np.testing.assert_array_equal(several[column], one[column])
    np.testing.assert_allclose(several["log10_grad_norm"], one["log10_grad_norm"], rtol=1e-5)
    assert sorted(path.name for path in (tmp_path / "several" / "units").iterdir()) == sorted(
        path.name for path in (tmp_path / "one" / "units").iterdir())


def _worker(port: str, process: int, folder: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=PROCESSES, process_id=process)
    values = computations()
    sample = lambda key: TASK.sample(key, 8)  # noqa: E731
    batch_sharding = train._shardings(train._task_batch_axes(TASK, 8), sample, jax.random.key(0))[0]
    inputs_shape = jax.eval_shape(sample, jax.random.key(0))["inputs"].shape
    config_sharding, _ = sweep._config_sharding(len(GRID))
    np.savez(os.path.join(folder, f"process{process}.npz"), **values, process_count=jax.process_count(),
             global_devices=len(jax.devices()), local_devices=len(jax.local_devices()),
             batch_shard=batch_sharding["inputs"].shard_shape(inputs_shape)[1],
             config_shard=config_sharding.shard_shape((len(GRID),))[0])
    jax.distributed.shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
