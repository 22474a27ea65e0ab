"""Training: truncated BPTT against hand-written gradients, clipping, nan guards, atomic checkpoints, exact resume."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rnnlab
from rnnlab import checkpoint, models, tasks, train

TASK = tasks.LagTask(seq_len=12, lag=2)
MODEL = models.ManyToMany(rnnlab.GRU(8), TASK.output_size)


def _params():
    return MODEL.init(jax.random.key(0), TASK.input_size)


def _chunk_loss(params, carry, chunk):
    logits, carry = MODEL(params, chunk["inputs"], carry=carry)
    return TASK.loss(logits, chunk), carry


def _batch_fn(key):
    return TASK.sample(key, 4)


def _hand_loss(params, xs, labels, weights, h0):
    """The lag-task loss written out with a Python loop over GRU steps: an answer independent of scan and models."""
    cell = MODEL.cell
    h, total = h0, 0.0
    for t in range(xs.shape[0]):
        h, _ = cell(params["cell"], h, xs[t])
        logits = h @ params["readout"]["w"] + params["readout"]["b"]
        nll = -jax.nn.log_softmax(logits)[jnp.arange(labels.shape[1]), labels[t]]
        total = total + jnp.sum(nll * weights[t])
    return total / jnp.maximum(jnp.sum(weights), 1.0), h


def _assert_trees_close(a, b, **tolerance):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)


def test_truncation_with_full_window_equals_full_bptt():
    data_key = jax.random.key(3)
    truncated = train.train(_chunk_loss, _params(), optax.adam(1e-2), _batch_fn, steps=3, data_key=data_key,
                            truncation=train.Truncation(TASK.seq_len, TASK.seq_len), progress=False)

    def full_loss(params, batch):
        h0 = MODEL.cell.initial_carry((4,))
        return _hand_loss(params, batch["inputs"], batch["labels"], batch["weights"], h0)[0]

    full = train.train(full_loss, _params(), optax.adam(1e-2), _batch_fn, steps=3, data_key=data_key,
                       progress=False)
    _assert_trees_close(truncated.params, full.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(truncated.history["loss"], full.history["loss"], rtol=1e-5)


@pytest.mark.parametrize("k2_chunks", [1, 2])
def test_truncated_updates_match_hand_computed_gradients(k2_chunks):
    """SGD(lr=1), T = 2·k1: update 1 uses chunk 1; update 2 uses chunk 2's loss, back through k2 steps only."""
    k1 = TASK.seq_len // 2
    data_key = jax.random.key(5)
    run = train.train(_chunk_loss, _params(), optax.sgd(1.0), _batch_fn, steps=1, data_key=data_key,
                      truncation=train.Truncation(k1, k2_chunks * k1), progress=False)
    batch = _batch_fn(jax.random.fold_in(data_key, 0))
    first, second = (jax.tree_util.tree_map(lambda a, s=s: a[s], batch) for s in (slice(0, k1), slice(k1, None)))
    h0 = MODEL.cell.initial_carry((4,))

    def chunk_loss(params, chunk, h):
        return _hand_loss(params, chunk["inputs"], chunk["labels"], chunk["weights"], h)

    p0 = _params()
    grads, h1 = jax.grad(chunk_loss, has_aux=True)(p0, first, h0)
    p1 = jax.tree_util.tree_map(lambda p, g: p - g, p0, grads)
    if k2_chunks == 1:
        grads = jax.grad(lambda p: chunk_loss(p, second, jax.lax.stop_gradient(h1))[0])(p1)
    else:
        # window of both chunks from the initial carry, loss of the second chunk only
        grads = jax.grad(lambda p: chunk_loss(p, second, chunk_loss(p, first, h0)[1])[0])(p1)
    p2 = jax.tree_util.tree_map(lambda p, g: p - g, p1, grads)
    _assert_trees_close(run.params, p2, rtol=1e-4, atol=1e-6)
    assert run.history["update"].tolist() == [0, 1]


def test_truncation_rejects_bad_windows():
    with pytest.raises(ValueError, match="multiple of k1"):
        train.Truncation(4, 6)
    with pytest.raises(ValueError, match="divide the sequence length"):
        train.train(_chunk_loss, _params(), optax.sgd(0.1), _batch_fn, steps=1, data_key=jax.random.key(0),
                    truncation=train.Truncation(5, 5), progress=False)


def test_clipped_update_never_exceeds_clip_norm():
    clip = 0.05
    task = tasks.AddingProblem(8)
    model = models.ManyToOne(rnnlab.RNN(8, recurrent_init=rnnlab.init.orthogonal(3.0)), 1)

    def loss(params, batch):
        return 100.0 * task.loss(model(params, batch["inputs"]), batch)

    params = model.init(jax.random.key(1), 2)
    run = train.train(loss, params, optax.sgd(1.0), lambda k: task.sample(k, 16), steps=5,
                      data_key=jax.random.key(2), clip=clip, progress=False)
    assert np.all(run.history["grad_norm"] > clip)  # the clip was active
    assert np.all(run.history["update_norm"] <= clip * (1 + 1e-5))
    one = train.train(loss, params, optax.sgd(1.0), lambda k: task.sample(k, 16), steps=1,
                      data_key=jax.random.key(2), clip=clip, progress=False)
    moved = np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2)
                        for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(params))))
    assert moved == pytest.approx(clip, rel=1e-4)


def _nan_batch_fn(key):
    return jnp.where(jax.random.uniform(key) < 0.25, jnp.nan, 1.0)


def _quadratic(params, scale):
    return scale * jnp.sum(params["w"] ** 2)


def test_nonfinite_loss_stops_with_the_step():
    data_key = jax.random.key(7)
    bad_steps = [s for s in range(40) if jax.random.uniform(jax.random.fold_in(data_key, s)) < 0.25]
    params = {"w": jnp.ones(3)}
    with pytest.raises(train.NonFiniteError, match=f"step {bad_steps[0]} ") as error:
        train.train(_quadratic, params, optax.sgd(0.01), _nan_batch_fn, steps=40, data_key=data_key,
                    progress=False)
    assert error.value.step == bad_steps[0]
    expected = np.ones(3) * (1 - 2 * 0.01) ** bad_steps[0]
    np.testing.assert_allclose(error.value.result.params["w"], expected, rtol=1e-5)


def test_nonfinite_updates_are_skipped_by_option():
    data_key = jax.random.key(7)
    bad_steps = [s for s in range(40) if jax.random.uniform(jax.random.fold_in(data_key, s)) < 0.25]
    run = train.train(_quadratic, {"w": jnp.ones(3)}, optax.sgd(0.01), _nan_batch_fn, steps=40,
                      data_key=data_key, on_nonfinite="skip", progress=False)
    assert train.count_nonfinite(run) == len(bad_steps) > 0
    np.testing.assert_allclose(run.params["w"], np.ones(3) * 0.98 ** (40 - len(bad_steps)), rtol=1e-5)
    assert np.isnan(run.history["loss"][bad_steps]).all()


class _Killed(Exception):
    pass


def test_resume_after_kill_is_bit_identical(tmp_path):
    task = tasks.AddingProblem(6)
    model = models.ManyToOne(rnnlab.LSTM(6), 1)

    def loss(params, batch):
        return task.loss(model(params, batch["inputs"]), batch)

    def run(**options):
        return train.train(loss, model.init(jax.random.key(0), 2), optax.adam(1e-2), lambda k: task.sample(k, 8),
                           steps=20, data_key=jax.random.key(1), clip=1.0, progress=False,
                           eval_fn=lambda p: {"test_loss": loss(p, task.sample(jax.random.key(9), 32))},
                           eval_every=5, **options)

    uninterrupted = run()
    path = os.fspath(tmp_path / "run.msgpack")

    def kill_at_13(step, params):
        if step == 13:
            raise _Killed

    with pytest.raises(_Killed):
        run(checkpoint_path=path, checkpoint_every=5, callback=kill_at_13)
    resumed = run(checkpoint_path=path, checkpoint_every=5)
    for a, b in zip(jax.tree_util.tree_leaves((uninterrupted.params, uninterrupted.opt_state)),
                    jax.tree_util.tree_leaves((resumed.params, resumed.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name in train.HISTORY_COLUMNS:
        np.testing.assert_array_equal(uninterrupted.history[name], resumed.history[name])
    np.testing.assert_array_equal(uninterrupted.evals["test_loss"], resumed.evals["test_loss"])


def test_checkpoint_write_killed_midway_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "state.msgpack"
    checkpoint.save(path, {"w": np.arange(3.0), "step": 1})

    def killed(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"w": np.arange(3.0) + 10, "step": 2})
    monkeypatch.undo()
    restored = checkpoint.restore(path, {"w": np.zeros(3), "step": 0})
    np.testing.assert_array_equal(restored["w"], np.arange(3.0))
    assert restored["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["state.msgpack"]


def test_checkpoint_of_another_run_is_refused(tmp_path):
    path = tmp_path / "state.msgpack"
    checkpoint.save(path, {"w": np.arange(3.0)})
    with pytest.raises(ValueError, match="does not match"):
        checkpoint.restore(path, {"v": np.zeros(3), "step": 0})
    assert checkpoint.restore(tmp_path / "missing.msgpack", {"w": np.zeros(3)}) is None


def test_bad_options_raise():
    with pytest.raises(ValueError, match="on_nonfinite"):
        train.train(_quadratic, {"w": jnp.ones(3)}, optax.sgd(0.1), _nan_batch_fn, steps=1,
                    data_key=jax.random.key(0), on_nonfinite="ignore")
    # Within a mesh of explicit axes (jax.sharding's explicit mode): train splits the batch in auto mode.
    explicit = jax.make_mesh((1,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(explicit), pytest.raises(ValueError, match="within jax.set_mesh of .* explicit axes"):
        train.train(_quadratic, {"w": jnp.ones(3)}, optax.sgd(0.1), _nan_batch_fn, steps=1,
                    data_key=jax.random.key(0))
