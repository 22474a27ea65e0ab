r"""Tasks: batch generators that are pure functions of a `jax.random` key, each with its trivial baseline.

Every batch is a dict of time-major arrays (``inputs [T, batch, I]`` first); ``task.sample(key, batch_size)`` gives
the same batch for the same key. ``task.loss(predictions, batch)`` is the task's own loss (MSE or cross-entropy in
nats) and ``task.baseline`` the loss of the best predictor that remembers nothing, in closed form.

=======================  ==================================================  ==========================================
task                     source                                              memoryless baseline
=======================  ==================================================  ==========================================
`AddingProblem`          Hochreiter & Schmidhuber 1997; U[0,1] variant of    ``Var(a + b) = 2/12 = 0.167`` (predict 1)
                         Arjovsky, Shah & Bengio 2016
`CopyTask`               Arjovsky, Shah & Bengio 2016                        ``10 log 8 / (T + 20)``
`LagTask`                a bit stream echoed ``lag`` steps later             ``log 2``
`SequentialDigits`       scikit-learn's 8×8 digits, pixel by pixel (the      entropy of the labels (≈ ``log 10``)
                         small cousin of sequential MNIST, Le et al. 2015)
=======================  ==================================================  ==========================================
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from rnnlab.models import cross_entropy, weighted_mean


def _check_positive(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class AddingProblem:
    r"""The adding problem, U[0,1] variant (Arjovsky et al. 2016, §4.2; after Hochreiter & Schmidhuber 1997).

    Two input streams of length ``seq_len``: values ``a_t ~ U[0, 1]`` and markers, zero except one 1 in the first
    half and one in the second half. The target is the sum of the two marked values. Predicting its mean, 1, gives
    MSE ``Var(a + b) = 2 · 1/12 = 0.167``: the baseline. Solved means test MSE < 0.01.

    **Batch:** ``inputs [T, B, 2]`` (value, marker), ``targets [B, 1]``.
    """

    seq_len: int
    input_size = 2
    output_size = 1
    baseline = 1.0 / 6.0

    def __post_init__(self):
        _check_positive("seq_len", self.seq_len)
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (one marker in each half), got {self.seq_len}.")

    def sample(self, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
        key_values, key_first, key_second = jax.random.split(key, 3)
        half = self.seq_len // 2
        values = jax.random.uniform(key_values, (self.seq_len, batch_size))
        first = jax.random.randint(key_first, (batch_size,), 0, half)
        second = jax.random.randint(key_second, (batch_size,), half, self.seq_len)
        steps = jnp.arange(self.seq_len)[:, None]
        markers = ((steps == first) | (steps == second)).astype(values.dtype)
        targets = jnp.sum(values * markers, axis=0)[:, None]
        return {"inputs": jnp.stack([values, markers], axis=-1), "targets": targets}

    def loss(self, predictions: jax.Array, batch) -> jax.Array:
        """Mean squared error of ``predictions [B, 1]``."""
        return jnp.mean((predictions - batch["targets"]) ** 2)


@dataclasses.dataclass(frozen=True)
class CopyTask:
    r"""The copy task (Arjovsky et al. 2016, §4.1; after Hochreiter & Schmidhuber 1997).

    Input of length ``delay + 2 · copy_len``: ``copy_len`` symbols drawn uniformly from ``1..num_symbols``, then
    ``delay - 1`` blanks (0), a delimiter (``num_symbols + 1``) and ``copy_len`` blanks. The output is blank for
    ``delay + copy_len`` steps and then repeats the symbols. A memoryless model predicts blank, then uniformly over
    the symbols: cross-entropy ``copy_len · log(num_symbols) / (delay + 2 · copy_len)`` per step.

    **Batch:** ``inputs [T, B, num_symbols + 2]`` (one-hot), ``labels [T, B]`` in ``0..num_symbols``.
    """

    delay: int
    num_symbols: int = 8
    copy_len: int = 10

    def __post_init__(self):
        for name in ("delay", "num_symbols", "copy_len"):
            _check_positive(name, getattr(self, name))

    @property
    def seq_len(self) -> int:
        return self.delay + 2 * self.copy_len

    @property
    def input_size(self) -> int:
        return self.num_symbols + 2

    @property
    def output_size(self) -> int:
        return self.num_symbols + 1

    @property
    def baseline(self) -> float:
        return self.copy_len * math.log(self.num_symbols) / self.seq_len

    def sample(self, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
        symbols = jax.random.randint(key, (self.copy_len, batch_size), 1, self.num_symbols + 1)
        blanks = jnp.zeros((self.delay - 1, batch_size), symbols.dtype)
        delimiter = jnp.full((1, batch_size), self.num_symbols + 1, symbols.dtype)
        tail = jnp.zeros((self.copy_len, batch_size), symbols.dtype)
        tokens = jnp.concatenate([symbols, blanks, delimiter, tail])
        labels = jnp.concatenate([jnp.zeros((self.delay + self.copy_len, batch_size), symbols.dtype), symbols])
        return {"inputs": jax.nn.one_hot(tokens, self.input_size), "labels": labels}

    def loss(self, logits: jax.Array, batch) -> jax.Array:
        """Mean cross-entropy (nats) over all steps of ``logits [T, B, num_symbols + 1]``."""
        return jnp.mean(cross_entropy(logits, batch["labels"]))

    def accuracy(self, logits: jax.Array, batch) -> jax.Array:
        """Fraction of the ``copy_len`` recalled symbols predicted exactly (argmax)."""
        recalled = slice(self.delay + self.copy_len, None)
        return jnp.mean(jnp.argmax(logits[recalled], -1) == batch["labels"][recalled])


@dataclasses.dataclass(frozen=True)
class LagTask:
    r"""Echo a random bit stream ``lag`` steps later: the task with a known lag for the truncated-BPTT ablation.

    Bits ``b_t ~ Bernoulli(1/2)`` arrive as ``x_t = 2 b_t - 1``; at every step ``t ≥ lag`` the label is
    ``b_{t-lag}`` (steps ``t < lag`` carry weight 0). Nothing before ``t - lag + 1`` helps, so without memory of
    ``lag`` steps the cross-entropy is ``log 2``; a model that can see ``lag`` steps back reaches 0. Truncated BPTT
    whose window cannot span the lag never receives the gradient that would teach it.

    **Batch:** ``inputs [T, B, 1]``, ``labels [T, B]``, ``weights [T, B]``.
    """

    seq_len: int
    lag: int
    input_size = 1
    output_size = 2
    baseline = math.log(2.0)

    def __post_init__(self):
        _check_positive("seq_len", self.seq_len)
        _check_positive("lag", self.lag)
        if self.lag >= self.seq_len:
            raise ValueError(f"lag must be below seq_len; got lag={self.lag}, seq_len={self.seq_len}.")

    def sample(self, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
        bits = jax.random.bernoulli(key, 0.5, (self.seq_len, batch_size)).astype(jnp.int32)
        labels = jnp.concatenate([jnp.zeros((self.lag, batch_size), jnp.int32), bits[: -self.lag]])
        weights = (jnp.arange(self.seq_len) >= self.lag)[:, None] * jnp.ones((1, batch_size))
        return {"inputs": (2.0 * bits - 1.0)[..., None], "labels": labels, "weights": weights}

    def loss(self, logits: jax.Array, batch) -> jax.Array:
        """Weighted mean cross-entropy (nats) of ``logits [T, B, 2]``; a chunk of a batch works the same."""
        return weighted_mean(cross_entropy(logits, batch["labels"]), batch["weights"])

    def accuracy(self, logits: jax.Array, batch) -> jax.Array:
        return weighted_mean(jnp.argmax(logits, -1) == batch["labels"], batch["weights"])


@dataclasses.dataclass(frozen=True, eq=False)
class SequentialDigits:
    r"""scikit-learn's 8×8 handwritten digits (1797 images, 10 classes) read one pixel per step: 64 steps of one
    feature in ``[0, 1]``, classified from the last step — a small, offline cousin of sequential MNIST (Le, Jaitly &
    Hinton 2015). ``permuted=True`` applies one fixed random permutation of the 64 pixels (drawn from
    ``permutation_seed``), which spreads neighbouring pixels far apart in time.

    The split is fixed: 360 test images (drawn with ``split_seed``), the rest for training. The baseline is the
    cross-entropy of the training label frequencies on the test set (≈ log 10: the classes are balanced).

    **Batch:** ``inputs [64, B, 1]``, ``labels [B]``.
    """

    permuted: bool = False
    permutation_seed: int = 0
    split_seed: int = 0
    test_size: int = 360
    input_size = 1
    output_size = 10
    seq_len = 64

    def __post_init__(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.asarray(digits.data, np.float32) / 16.0
        labels = np.asarray(digits.target, np.int32)
        if self.permuted:
            images = images[:, np.random.default_rng(self.permutation_seed).permutation(images.shape[1])]
        order = np.random.default_rng(self.split_seed).permutation(len(labels))
        test, train = order[: self.test_size], order[self.test_size:]
        object.__setattr__(self, "train_images", jnp.asarray(images[train]))
        object.__setattr__(self, "train_labels", jnp.asarray(labels[train]))
        object.__setattr__(self, "test_images", jnp.asarray(images[test]))
        object.__setattr__(self, "test_labels", jnp.asarray(labels[test]))

    @property
    def baseline(self) -> float:
        prior = np.bincount(np.asarray(self.train_labels), minlength=10) / len(self.train_labels)
        test = np.asarray(self.test_labels)
        return float(-np.mean(np.log(prior[test])))

    @staticmethod
    def _batch(images: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        return {"inputs": images.T[..., None], "labels": labels}

    def sample(self, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
        index = jax.random.randint(key, (batch_size,), 0, self.train_labels.shape[0])
        return self._batch(self.train_images[index], self.train_labels[index])

    def test_batch(self) -> dict[str, jax.Array]:
        return self._batch(self.test_images, self.test_labels)

    def loss(self, logits: jax.Array, batch) -> jax.Array:
        return jnp.mean(cross_entropy(logits, batch["labels"]))

    def accuracy(self, logits: jax.Array, batch) -> jax.Array:
        return jnp.mean(jnp.argmax(logits, -1) == batch["labels"])
