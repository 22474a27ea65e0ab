"""The four model shapes: shapes, lengths, decoding, and a tiny instance of each trained past its baseline."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rnnlab
from rnnlab import models, tasks, train

KEY = jax.random.key(0)
EXTRA_CELLS = {"bidirectional_stack": rnnlab.Stack.repeat(rnnlab.GRU(5), 2, bidirectional=True)}


def test_shapes_over_every_cell(cell):
    xs = jax.random.normal(KEY, (7, 3, 2))
    many_to_one = models.ManyToOne(cell, 4)
    assert many_to_one(many_to_one.init(KEY, 2), xs).shape == (3, 4)
    many_to_many = models.ManyToMany(cell, 4)
    outputs, _ = many_to_many(many_to_many.init(KEY, 2), xs)
    assert outputs.shape == (7, 3, 4)


def test_many_to_one_with_lengths_reads_each_sequence_at_its_end():
    model = models.ManyToOne(rnnlab.LSTM(6), 2)
    params = model.init(KEY, 3)
    xs = jax.random.normal(KEY, (9, 4, 3))
    lengths = jnp.array([9, 1, 5, 3])
    batched = model(params, xs, lengths=lengths)
    for b, length in enumerate(lengths.tolist()):
        alone = model(params, xs[:length, b:b + 1])  # independent: the sequence cut at its length
        np.testing.assert_allclose(batched[b], alone[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", [rnnlab.LSTM(5), rnnlab.GRU(5), rnnlab.RNN(5),
                                  rnnlab.RNN(5, activation=jax.nn.soft_sign)],
                         ids=["lstm", "gru", "rnn_tanh", "rnn_soft_sign"])
def test_many_to_one_with_remat_equals_plain_bptt(cell):
    """With ``remat`` the last output comes from the final carry (rnnlab's fused cells, whose output is their hidden
    state) or is carried along the scan (other cells, such as an RNN with an activation given as a function): the
    outputs and every gradient are plain BPTT's. (A Stack reads it from ``ys``: `rnnlab.scan`'s remat tests.)"""
    plain, remat = models.ManyToOne(cell, 2), models.ManyToOne(cell, 2, remat=4)
    params = plain.init(KEY, 3)
    xs = jax.random.normal(KEY, (12, 4, 3))
    for lengths in (None, jnp.array([12, 1, 5, 8])):
        def value_and_grad(model):
            return jax.jit(jax.value_and_grad(lambda p: jnp.sum(jnp.sin(model(p, xs, lengths=lengths)))))(params)

        got, want = value_and_grad(remat), value_and_grad(plain)
        for got_leaf, want_leaf in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
            # float32, summed in another order: within 1e-5 of the leaf's largest entry
            np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-5 * np.max(np.abs(want_leaf)))


@pytest.mark.parametrize("cell", [rnnlab.LSTM(32), rnnlab.RNN(32, activation=jax.nn.soft_sign)],
                         ids=["fused", "output_carried"])
def test_many_to_one_with_remat_stores_memory_growing_as_sqrt_T(cell):
    """XLA's accounting of the gradient's temporaries (the inputs are arguments): with ``remat = √T`` a 16x longer
    sequence needs about 4x the memory (T / remat + remat), without it 16x."""

    def stored_bytes(seq_len, remat):
        model = models.ManyToOne(cell, 1, remat=remat)
        params = model.init(KEY, 3)
        xs = jax.ShapeDtypeStruct((seq_len, 2, 3), jnp.float32)
        loss = jax.grad(lambda p, xs: jnp.sum(model(p, xs) ** 2))
        return jax.jit(loss).lower(params, xs).compile().memory_analysis().temp_size_in_bytes

    def exponent(remat_short, remat_long):
        return math.log(stored_bytes(4096, remat_long) / stored_bytes(256, remat_short)) / math.log(16)

    assert exponent(16, 64) <= 0.5
    assert exponent(None, None) >= 0.9


def test_many_to_many_carry_chains_chunks():
    model = models.ManyToMany(rnnlab.GRU(6), 2)
    params = model.init(KEY, 3)
    xs = jax.random.normal(KEY, (10, 2, 3))
    whole, _ = model(params, xs)
    first, carry = model(params, xs[:4])
    second, _ = model(params, xs[4:], carry=carry)
    np.testing.assert_allclose(np.concatenate([first, second]), whole, rtol=1e-5, atol=1e-6)


def test_sampling_temperature():
    logits = jnp.array([[0.0, 2.0, 1.0]] * 4000)
    np.testing.assert_array_equal(models.sample_logits(KEY, logits, 0.0), 1)
    draws = np.asarray(models.sample_logits(KEY, logits, 1.0))
    frequencies = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(frequencies, jax.nn.softmax(logits[0]), atol=0.03)
    hot = np.asarray(models.sample_logits(KEY, logits, 100.0))
    np.testing.assert_allclose(np.bincount(hot, minlength=3) / len(hot), 1 / 3, atol=0.03)


def _fit(loss_fn, params, batch_fn, steps, lr=1e-2):
    return train.train(loss_fn, params, optax.adam(lr), batch_fn, steps=steps, data_key=jax.random.key(1),
                       clip=1.0, progress=False).params


def test_many_to_one_beats_baseline_on_the_adding_problem():
    task = tasks.AddingProblem(10)
    model = models.ManyToOne(rnnlab.GRU(16), 1)
    loss_fn, _, _ = train.task_losses(task, model)
    params = _fit(loss_fn, model.init(KEY, 2), lambda k: task.sample(k, 32), 300)
    assert float(loss_fn(params, task.sample(jax.random.key(9), 1000))) < 0.3 * task.baseline


def test_many_to_many_beats_baseline_on_the_lag_task():
    task = tasks.LagTask(20, 2)
    model = models.ManyToMany(rnnlab.GRU(16), 2)
    loss_fn, _, _ = train.task_losses(task, model)
    params = _fit(loss_fn, model.init(KEY, 1), lambda k: task.sample(k, 32), 200)
    assert float(loss_fn(params, task.sample(jax.random.key(9), 500))) < 0.3 * task.baseline


PATTERN = np.array([0, 1, 2, 3, 2, 1])  # a periodic "text": the next symbol follows from the last two


def _pattern_batch(key, seq_len=13, batch=16):
    offsets = jax.random.randint(key, (batch,), 0, len(PATTERN))
    tokens = jnp.asarray(PATTERN)[(offsets[None, :] + jnp.arange(seq_len)[:, None]) % len(PATTERN)]
    return {"inputs": jax.nn.one_hot(tokens[:-1], 4), "labels": tokens[1:]}


def test_one_to_many_generation_learns_a_periodic_sequence():
    model = models.ManyToMany(rnnlab.LSTM(16), 4)

    def loss_fn(params, batch):
        return jnp.mean(models.cross_entropy(model(params, batch["inputs"])[0], batch["labels"]))

    params = _fit(loss_fn, model.init(KEY, 4), _pattern_batch, 300)
    assert float(loss_fn(params, _pattern_batch(jax.random.key(5)))) < 0.2 * math.log(4)
    prompt = jnp.array([[0], [1]])  # "0 1": the pattern from its start
    generated = models.generate(model, params, KEY, prompt, 10, vocab_size=4, temperature=0.0)[:, 0]
    expected = PATTERN[(np.arange(10) + 2) % len(PATTERN)]
    np.testing.assert_array_equal(generated, expected)


def test_seq2seq_learns_to_reverse_and_double():
    """Output length differs from input: ``a b c -> c c b b a a``."""
    src_len, vocab = 4, 5  # tokens 1..4; 0 is the decoder's start token

    def batch_fn(key):
        src = jax.random.randint(key, (src_len, 32), 1, vocab)
        return {"src": src, "tgt": jnp.repeat(src[::-1], 2, axis=0)}

    model = models.Seq2Seq(rnnlab.GRU(32), rnnlab.GRU(32), src_vocab=vocab, tgt_vocab=vocab, embed_size=8)

    def loss_fn(params, batch):
        return jnp.mean(models.cross_entropy(model(params, batch["src"], batch["tgt"]), batch["tgt"]))

    params = _fit(loss_fn, model.init(KEY), batch_fn, 400)
    test = batch_fn(jax.random.key(7))
    assert float(loss_fn(params, test)) < 0.3 * math.log(vocab - 1)
    decoded = model.decode(params, test["src"], 2 * src_len)
    assert float(jnp.mean(decoded == test["tgt"])) > 0.8
    sampled = model.decode(params, test["src"], 2 * src_len, key=KEY, temperature=1.0)
    assert sampled.shape == test["tgt"].shape
