"""Training with the batch split over devices (`train`'s ``batch_axes``): on 4 devices the numbers of one device,
the batch really split, a resumed run included; bad ``batch_axes`` raise.

A process fixes its device count when JAX starts, so the 4-device runs are this file run as a script in one fresh
process with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (4 virtual CPU devices), every case in turn; the
reference is the same run on one CPU device in the test process. The child runs without the persistent compilation
cache: the sharding it reports is seen while compiling, which a cached program skips.
"""

import fcntl
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import rnnlab
from rnnlab import models, tasks, train

DEVICES = 4
BATCH = 8
ADDING = tasks.AddingProblem(seq_len=8)
ADDING_MODEL = models.ManyToOne(rnnlab.LSTM(8), ADDING.output_size)
LAG = tasks.LagTask(seq_len=12, lag=2)
LAG_MODEL = models.ManyToMany(rnnlab.LSTM(8), LAG.output_size)
#: Per compiled use of the inputs: ``(devices holding them, their batch size on each device)``.
SPLITS: list[tuple[int, int]] = []


def _watched(inputs):
    """``inputs [T, B, I]``, noting in `SPLITS` (at compile time) how they are split over devices."""

    def note(sharding):
        SPLITS.append((len(sharding.device_set), sharding.shard_shape(inputs.shape)[1]))

    jax.debug.inspect_array_sharding(inputs, callback=note)
    return inputs


def _adding_loss(params, batch):
    return ADDING.loss(ADDING_MODEL(params, _watched(batch["inputs"])), batch)


def _lag_chunk_loss(params, carry, chunk):
    logits, carry = LAG_MODEL(params, _watched(chunk["inputs"]), carry=carry)
    return LAG.loss(logits, chunk), carry


def run_full_bptt(batch_axes):
    return train.train(_adding_loss, ADDING_MODEL.init(jax.random.key(0), ADDING.input_size), optax.adam(1e-2),
                       lambda key: ADDING.sample(key, BATCH), steps=4, data_key=jax.random.key(1), clip=1.0,
                       batch_axes=batch_axes, progress=False)


def run_truncated_bptt(batch_axes):
    """Truncation(4, 8) on T = 12: 3 updates a batch, windows of one and two chunks, carries passed on."""
    return train.train(_lag_chunk_loss, LAG_MODEL.init(jax.random.key(0), LAG.input_size), optax.adam(1e-2),
                       lambda key: LAG.sample(key, BATCH), steps=2, data_key=jax.random.key(1),
                       truncation=train.Truncation(4, 8), batch_axes=batch_axes, progress=False)


def run_on_task(**options):
    return train.train_on_task(ADDING, ADDING_MODEL, seed=0, steps=6, batch_size=BATCH, learning_rate=1e-2,
                               test_size=64, eval_every=2, progress=False, **options)


class _Killed(Exception):
    pass


def _kill_at_3(step, params):
    if step == 3:
        raise _Killed


def run_on_task_resumed(checkpoint_path):
    """`run_on_task` with its default ``batch_axes``, killed after step 3 and resumed from the step-2 checkpoint."""
    try:
        run_on_task(checkpoint_path=checkpoint_path, checkpoint_every=2, callback=_kill_at_3)
    except _Killed:
        pass
    return run_on_task(checkpoint_path=checkpoint_path, checkpoint_every=2)


def _numbers(result) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves(result.params)
    numbers = {f"param_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    numbers.update({f"history_{name}": result.history[name] for name in train.HISTORY_COLUMNS})
    numbers.update({f"evals_{name}": values for name, values in result.evals.items()})
    numbers["param_devices"] = np.asarray([len(leaf.sharding.device_set) for leaf in leaves])
    numbers["param_replicated"] = np.asarray([leaf.sharding.is_fully_replicated for leaf in leaves])
    return numbers


CASES = ("full_bptt", "truncated_bptt", "on_task_resumed", "batch_of_6")


def _child(case: str, out: str) -> None:
    """The 4-device side of a test: run ``case`` and write its numbers, `SPLITS` and the devices to ``out``."""
    SPLITS.clear()
    numbers = {"devices": np.asarray(len(jax.devices()))}
    if case == "full_bptt":
        numbers.update(_numbers(run_full_bptt({"inputs": 1, "targets": 0})))
    elif case == "truncated_bptt":
        numbers.update(_numbers(run_truncated_bptt(1)))
    elif case == "on_task_resumed":
        numbers.update(_numbers(run_on_task_resumed(os.path.join(os.path.dirname(out), "run.msgpack"))))
    elif case == "batch_of_6":
        try:
            train.train(_adding_loss, ADDING_MODEL.init(jax.random.key(0), ADDING.input_size), optax.sgd(0.1),
                        lambda key: ADDING.sample(key, 6), steps=1, data_key=jax.random.key(1),
                        batch_axes={"inputs": 1, "targets": 0}, progress=False)
        except ValueError as error:
            numbers["error"] = np.asarray(str(error))
    numbers["splits"] = np.asarray(SPLITS, np.int64).reshape(-1, 2)
    np.savez(out, **numbers)


@pytest.fixture(scope="session")
def on_devices(tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """Every case's numbers from one fresh process with 4 devices (one start of JAX for all of them), started once
    per test session: under `pytest -n 2` the first worker to ask runs it, the other waits for it and reads it."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, shared by the workers
    folder = shared / "train_sharding_four_devices"
    with open(shared / "train_sharding_four_devices.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").exists():
            env = {name: value for name, value in os.environ.items() if name != "JAX_COMPILATION_CACHE_DIR"}
            env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} "
                       f"--xla_force_host_platform_device_count={DEVICES}".strip())
            completed = subprocess.run([sys.executable, __file__, str(folder)], env=env, capture_output=True,
                                       text=True, timeout=300)
            assert completed.returncode == 0, completed.stderr[-3000:]
            (folder / "done").touch()
    numbers = {case: dict(np.load(folder / case / "numbers.npz")) for case in CASES}
    assert all(case_numbers["devices"] == DEVICES for case_numbers in numbers.values())
    return numbers


def _on_one_cpu(run, *args, **options):
    with jax.default_device(jax.devices("cpu")[0]):
        return _numbers(run(*args, **options))


def _assert_same_numbers(sharded, reference):
    """Equal up to the order of float32 sums (a sum over 4 devices' partial sums instead of one)."""
    names = [name for name in reference if name.startswith(("param_", "history_", "evals_"))
             and name not in ("param_devices", "param_replicated")]
    assert names and set(names) <= set(sharded)
    for name in names:
        np.testing.assert_allclose(sharded[name], reference[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.all(sharded["param_devices"] == DEVICES) and np.all(sharded["param_replicated"])
    assert np.all(reference["param_devices"] == 1)


@pytest.mark.parametrize("case, run, batch_axes, updates", [
    ("full_bptt", run_full_bptt, None, 4),
    ("truncated_bptt", run_truncated_bptt, None, 6),
])
def test_split_batch_trains_as_on_one_device(on_devices, case, run, batch_axes, updates):
    sharded = on_devices[case]
    reference = _on_one_cpu(run, batch_axes)
    assert len(reference["history_loss"]) == updates
    _assert_same_numbers(sharded, reference)
    # every compiled use of the inputs holds a quarter of the batch on each of the 4 devices
    assert len(sharded["splits"]) and np.all(sharded["splits"] == [DEVICES, BATCH // DEVICES])


def test_train_on_task_splits_by_default_and_resumes(on_devices):
    sharded = on_devices["on_task_resumed"]
    reference = _on_one_cpu(run_on_task, batch_axes=None)
    assert reference["evals_step"].tolist() == [0, 2, 4, 6]
    _assert_same_numbers(sharded, reference)


def test_batch_size_not_a_multiple_of_the_device_count_raises(on_devices):
    message = str(on_devices["batch_of_6"]["error"])
    assert "batch_axes" in message and "size 6" in message and f"device count ({DEVICES})" in message


def test_task_batch_axes_follow_the_documented_layouts():
    # from the tasks' docstrings: AddingProblem inputs [T, B, 2], targets [B, 1]; LagTask every leaf [T, B, ...]
    assert train._task_batch_axes(ADDING, BATCH) == {"inputs": 1, "targets": 0}
    assert train._task_batch_axes(LAG, BATCH) == {"inputs": 1, "labels": 1, "weights": 1}


def test_a_second_process_finds_the_split_training_steps_in_the_persistent_cache(two_processes_cache):
    """With the batch split over 2 devices (the LSTM on the native kernels), a fresh process training the same model
    compiles nothing new, full and truncated BPTT and a jitted evaluation alike: the kernels are split by
    `jax.shard_map` (`rnnlab.split_batch`), not by a `custom_partitioning` callback, whose id would change the
    programs' persistent-cache keys in every process."""
    script = (
        "import jax, optax, rnnlab\n"
        "from rnnlab import models, sweep, tasks, train\n"
        "sweep.use_cpu_cores(2)\n"
        "task = tasks.LagTask(seq_len=12, lag=2)\n"
        "model = models.ManyToMany(rnnlab.LSTM(16), task.output_size)\n"
        "params = model.init(jax.random.key(0), task.input_size)\n"
        "def chunk_loss(params, carry, chunk):\n"
        "    logits, carry = model(params, chunk['inputs'], carry=carry)\n"
        "    return task.loss(logits, chunk), carry\n"
        "full = lambda params, batch: chunk_loss(params, None, batch)[0]\n"
        "evaluate, test = jax.jit(full), task.sample(jax.random.key(2), 16)\n"
        "for truncation, loss in [(None, full), (train.Truncation(4, 8), chunk_loss)]:\n"
        "    train.train(loss, params, optax.adam(1e-2), lambda key: task.sample(key, 8), steps=2,\n"
        "                data_key=jax.random.key(1), truncation=truncation, batch_axes=1, progress=False,\n"
        "                eval_fn=lambda params: {'loss': evaluate(params, test)}, eval_every=1)\n"
    )
    entries = two_processes_cache(script)
    assert any(name.startswith("jit_step") for name in entries[0])
    assert any(name.startswith("jit_update") for name in entries[0])
    assert any(name.startswith("jit__lambda") for name in entries[0])  # the evaluation
    assert entries[1] == entries[0]


@pytest.mark.parametrize("batch_axes, match", [
    (3, r"axis 3 .*\['inputs'\] of shape \(8, 8, 2\)"),
    ({"inputs": 1, "targets": "0"}, r"axis '0' .*\['targets'\]"),
    ({"inputs": 1}, "prefix of the batch"),
])
def test_bad_batch_axes_raise_on_one_device_too(batch_axes, match):
    with pytest.raises(ValueError, match=match):
        run_full_bptt(batch_axes)


if __name__ == "__main__":
    for name in CASES:
        os.makedirs(os.path.join(sys.argv[1], name), exist_ok=True)
        _child(name, os.path.join(sys.argv[1], name, "numbers.npz"))
