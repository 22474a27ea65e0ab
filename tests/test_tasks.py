"""Task generators: purity in the key, and statistics against their closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnlab import tasks

KEY = jax.random.key(0)


@pytest.mark.parametrize("task", [tasks.AddingProblem(20), tasks.CopyTask(5), tasks.LagTask(16, 3)], ids=str)
def test_same_key_same_batch(task):
    a, b, c = task.sample(KEY, 8), task.sample(KEY, 8), task.sample(jax.random.key(1), 8)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        assert a[name].shape[1 if a[name].ndim > 1 and name != "targets" else 0] == 8
    assert not np.array_equal(a["inputs"], c["inputs"])


def test_adding_problem_structure_and_baseline():
    seq_len, batch = 50, 20000
    data = jax.device_get(tasks.AddingProblem(seq_len).sample(KEY, batch))
    values, markers = data["inputs"][..., 0], data["inputs"][..., 1]
    assert data["inputs"].shape == (seq_len, batch, 2)
    np.testing.assert_array_equal(markers[: seq_len // 2].sum(0), 1)
    np.testing.assert_array_equal(markers[seq_len // 2:].sum(0), 1)
    np.testing.assert_allclose(data["targets"][:, 0], (values * markers).sum(0), rtol=1e-6)
    assert values.min() >= 0 and values.max() <= 1
    # Predicting the mean target 1 gives Var(a + b) = 1/6; standard error of the MSE estimate ≈ 0.0012 here.
    mse_of_one = float(np.mean((data["targets"] - 1.0) ** 2))
    assert mse_of_one == pytest.approx(tasks.AddingProblem.baseline, abs=0.005)
    assert float(tasks.AddingProblem(seq_len).loss(jnp.ones((batch, 1)), data)) == pytest.approx(mse_of_one, rel=1e-5)


@pytest.mark.parametrize("delay", [1, 10, 100])
def test_copy_task_structure_and_memoryless_baseline(delay):
    task = tasks.CopyTask(delay)
    data = jax.device_get(task.sample(KEY, 512))
    tokens, labels = data["inputs"].argmax(-1), data["labels"]
    assert data["inputs"].shape == (delay + 20, 512, 10)
    np.testing.assert_array_equal(labels[-10:], tokens[:10])
    assert set(np.unique(tokens[:10])) == set(range(1, 9))
    np.testing.assert_array_equal(tokens[delay + 9], 9)  # the delimiter
    np.testing.assert_array_equal(np.delete(tokens, list(range(10)) + [delay + 9], axis=0), 0)
    np.testing.assert_array_equal(labels[:-10], 0)
    # The memoryless strategy: blank with certainty, then uniform over the 8 symbols.
    logits = np.full(labels.shape + (9,), -1e9, np.float32)
    logits[:-10, :, 0] = 0.0
    logits[-10:, :, 1:] = 0.0
    assert float(task.loss(jnp.asarray(logits), data)) == pytest.approx(10 * math.log(8) / (delay + 20), rel=1e-5)
    assert task.baseline == pytest.approx(10 * math.log(8) / (delay + 20))
    counts = np.bincount(tokens[:10].ravel(), minlength=9)[1:]
    assert np.all(np.abs(counts / counts.sum() - 1 / 8) < 0.02)


def test_lag_task_echoes_and_baseline():
    task = tasks.LagTask(64, 5)
    data = jax.device_get(task.sample(KEY, 1024))
    bits = (data["inputs"][..., 0] > 0).astype(int)
    np.testing.assert_array_equal(data["labels"][5:], bits[:-5])
    np.testing.assert_array_equal(data["weights"][:5], 0)
    np.testing.assert_array_equal(data["weights"][5:], 1)
    assert abs(bits.mean() - 0.5) < 0.01
    # A float32 mean of about 60 000 terms, each log 2: its rounding depends on XLA's reduction order, which changed
    # between jaxlib releases (0.10.0 and 0.10.1: 7.7e-6 high, 130 ulps; 0.10.2: within 1e-6).
    assert float(task.loss(jnp.zeros((64, 1024, 2)), data)) == pytest.approx(math.log(2), rel=2e-5)
    perfect = 50.0 * jax.nn.one_hot(data["labels"], 2)
    assert float(task.accuracy(perfect, data)) == 1.0


def test_sequential_digits_balance_and_permutation():
    plain, permuted = tasks.SequentialDigits(), tasks.SequentialDigits(permuted=True)
    assert plain.train_images.shape == (1797 - 360, 64) and plain.test_images.shape == (360, 64)
    counts = np.bincount(np.asarray(plain.train_labels), minlength=10)
    assert np.all(np.abs(counts / counts.sum() - 0.1) < 0.015)
    assert plain.baseline == pytest.approx(math.log(10), abs=0.02)
    np.testing.assert_array_equal(plain.test_labels, permuted.test_labels)
    np.testing.assert_array_equal(np.sort(plain.test_images, 1), np.sort(permuted.test_images, 1))
    assert not np.array_equal(plain.test_images, permuted.test_images)
    batch = plain.sample(KEY, 16)
    assert batch["inputs"].shape == (64, 16, 1) and batch["labels"].shape == (16,)
    assert float(batch["inputs"].min()) >= 0 and float(batch["inputs"].max()) <= 1
    uniform = jnp.zeros((360, 10))
    assert float(plain.loss(uniform, plain.test_batch())) == pytest.approx(math.log(10), rel=1e-6)


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="lag"):
        tasks.LagTask(10, 10)
    with pytest.raises(ValueError, match="seq_len"):
        tasks.AddingProblem(1)
    with pytest.raises(ValueError, match="delay"):
        tasks.CopyTask(0)
