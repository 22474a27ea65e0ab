"""`rnnlab.scan` and `rnnlab.Stack`, over every library cell and a cell defined here, not in the library.

Each test checks against an independent answer: a Python loop over the step, per-sequence slicing, central finite
differences in float64, or a manual composition of scans.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnlab

INPUT_SIZE, SEQ_LEN = 3, 6


@dataclasses.dataclass(frozen=True)
class MinimalRNN:
    r"""MinimalRNN (Chen 2017, "MinimalRNN: Toward More Interpretable and Trainable Recurrent Neural Networks").

    .. math:: z = \tanh(x W_x + b_z), \quad u = \sigma(h U_h + z U_z + b_u), \quad h' = u h + (1 - u) z

    Written against the bare cell protocol only (no ``project_inputs``, no ``input_size``): the library must run it
    with no change.
    """

    hidden_size: int

    def init(self, key, input_size, dtype=jnp.float32):
        key_x, key_h, key_z = jax.random.split(key, 3)
        normal = jax.nn.initializers.lecun_normal()
        return {
            "w_x": normal(key_x, (input_size, self.hidden_size), dtype),
            "u_h": normal(key_h, (self.hidden_size, self.hidden_size), dtype),
            "u_z": normal(key_z, (self.hidden_size, self.hidden_size), dtype),
            "b_z": jnp.zeros((self.hidden_size,), dtype),
            "b_u": jnp.ones((self.hidden_size,), dtype),
        }

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros((*batch_shape, self.hidden_size), dtype)

    def hidden(self, carry):
        return carry

    def __call__(self, params, h, x):
        z = jnp.tanh(x @ params["w_x"] + params["b_z"])
        u = jax.nn.sigmoid(h @ params["u_h"] + z @ params["u_z"] + params["b_u"])
        h_new = u * h + (1.0 - u) * z
        return h_new, h_new


EXTRA_CELLS = {"minimal_rnn": MinimalRNN(hidden_size=4)}


@dataclasses.dataclass(frozen=True)
class PlainStep:
    """A cell seen through the bare protocol only, so `scan` cannot hoist the input matmul."""

    cell: Any

    def init(self, key, input_size, dtype=jnp.float32):
        return self.cell.init(key, input_size, dtype)

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return self.cell.initial_carry(batch_shape, dtype)

    def hidden(self, carry):
        return self.cell.hidden(carry)

    def __call__(self, params, carry, x):
        return self.cell(params, carry, x)


def make_problem(cell, batch_shape=(2,), seed=0, dtype=jnp.float32):
    """Parameters, inputs ``[T, *batch, I]`` and a random (non-zero) initial carry."""
    key_p, key_x, key_c = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = cell.init(key_p, INPUT_SIZE, dtype)
    xs = jax.random.normal(key_x, (SEQ_LEN, *batch_shape, INPUT_SIZE), dtype)
    zeros = cell.initial_carry(batch_shape, dtype)
    leaf_keys = jax.random.split(key_c, len(jax.tree_util.tree_leaves(zeros)))
    carry = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(zeros),
        [0.5 * jax.random.normal(k, leaf.shape, dtype) for k, leaf in zip(leaf_keys, jax.tree_util.tree_leaves(zeros))],
    )
    return params, xs, carry


def python_loop(cell, params, xs, carry, reverse=False):
    """The reference: the step function applied in a plain Python loop over ``xs [T, *batch, I]``."""
    steps = range(xs.shape[0] - 1, -1, -1) if reverse else range(xs.shape[0])
    ys = [None] * xs.shape[0]
    for t in steps:
        carry, ys[t] = cell(params, carry, xs[t])
    return jnp.stack(ys), carry


def scalar_loss(cell, ys, final_carry):
    """A loss touching every output and the final hidden state with distinct weights (so no gradient hides)."""
    out_weights = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
    hidden = cell.hidden(final_carry)
    hidden_weights = jnp.sin(jnp.arange(hidden.size, dtype=hidden.dtype) + 1.0).reshape(hidden.shape)
    return jnp.sum(ys * out_weights) + jnp.sum(hidden * hidden_weights)


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


@pytest.mark.parametrize("batch_shape", [(), (2, 3)], ids=["unbatched", "batch2x3"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_scan_matches_python_loop(cell, batch_shape, reverse):
    params, xs, carry = make_problem(cell, batch_shape)
    ys, final = rnnlab.scan(cell, params, xs, carry=carry, reverse=reverse)
    ys_loop, final_loop = python_loop(cell, params, xs, carry, reverse=reverse)
    assert_trees_close((ys, final), (ys_loop, final_loop))


def test_jit_matches_no_jit(cell):
    params, xs, carry = make_problem(cell, (3,))
    lengths = jnp.array([SEQ_LEN, 1, 4])

    def run(params, xs, carry, lengths):
        return rnnlab.scan(cell, params, xs, carry=carry, lengths=lengths, reverse=True)

    assert_trees_close(jax.jit(run)(params, xs, carry, lengths), run(params, xs, carry, lengths), rtol=1e-6)


@functools.partial(jax.jit, static_argnames=("cell", "reverse", "unroll", "remat"))
def loss_and_grads(cell, params, xs, carry, lengths=None, *, reverse=False, unroll=1, remat=None):
    """The loss and its gradient with respect to ``(params, xs, carry)``; jitted so tests sharing a baseline share
    its compilation (jit == no jit is its own test)."""

    def loss(params, xs, carry):
        ys, final = rnnlab.scan(cell, params, xs, carry=carry, lengths=lengths, reverse=reverse, unroll=unroll,
                                remat=remat)
        return scalar_loss(cell, ys, final)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(params, xs, carry)


OPTIONS = {
    "unroll3_remat2": dict(unroll=3, remat=2),
    "remat3_lengths_reverse": dict(remat=3, lengths=jnp.array([6, 2]), reverse=True),
    "plain_path_lengths_reverse": dict(lengths=jnp.array([6, 2]), reverse=True),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_options_change_neither_values_nor_gradients(cell, option):
    """``unroll``, ``remat`` and the plain (un-hoisted) step give the values and gradients of the default path."""
    params, xs, carry = make_problem(cell, (2,))
    kwargs = dict(OPTIONS[option])
    baseline_kwargs = {k: v for k, v in kwargs.items() if k in ("lengths", "reverse")}
    other_cell = PlainStep(cell) if option.startswith("plain_path") else cell
    expected = loss_and_grads(cell, params, xs, carry, **baseline_kwargs)
    assert_trees_close(loss_and_grads(other_cell, params, xs, carry, **kwargs), expected)


@pytest.mark.parametrize(
    "scan_kwargs",
    [dict(), dict(lengths=np.array([4, 6, 1]), reverse=True)],
    ids=["forward", "lengths_reverse"],
)
def test_gradients_match_central_finite_differences_float64(cell, scan_kwargs):
    """Directional derivatives of the loss in (params, xs, carry) along random directions against central
    differences, in float64.

    With step 1e-5 the truncation error is ~1e-10 and the rounding error ~1e-11 relative, so 1e-6 is a safe margin.
    """
    eps, n_directions = 1e-5, 3
    with jax.enable_x64(True):
        params, xs, carry = make_problem(cell, (3,), dtype=jnp.float64)
        point = (params, xs, carry)

        def loss(point):
            return scalar_loss(cell, *rnnlab.scan(cell, point[0], point[1], carry=point[2], **scan_kwargs))

        grad = jax.jit(jax.grad(loss))(point)
        leaves, treedef = jax.tree_util.tree_flatten(point)
        keys = jax.random.split(jax.random.PRNGKey(100), len(leaves))
        directions = [jax.random.normal(k, (n_directions, *leaf.shape), jnp.float64) for k, leaf in zip(keys, leaves)]
        # Points θ + εd then θ - εd for every direction d, evaluated in one vmapped call.
        signs = jnp.repeat(jnp.array([eps, -eps]), n_directions)
        shifted = [a + signs.reshape((-1,) + (1,) * a.ndim) * jnp.concatenate([d, d])
                   for a, d in zip(leaves, directions)]
        losses = jax.jit(jax.vmap(loss))(jax.tree_util.tree_unflatten(treedef, shifted))
        finite_difference = (losses[:n_directions] - losses[n_directions:]) / (2 * eps)
        analytic = sum(jnp.einsum("k...,...->k", d, g) for d, g in zip(directions, jax.tree_util.tree_leaves(grad)))
        np.testing.assert_allclose(np.asarray(analytic), np.asarray(finite_difference), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_lengths_match_per_sequence_slicing(cell, reverse):
    """Each sequence, cut to its length and scanned alone, gives that sequence's outputs and final carry; outputs at
    padded steps are exactly zero."""
    batch_shape = (2, 3)
    params, xs, carry = make_problem(cell, batch_shape)
    lengths = np.array([[1, 6, 3], [5, 2, 6]])
    ys, final = rnnlab.scan(cell, params, xs, carry=carry, lengths=lengths, reverse=reverse)
    for index in np.ndindex(*batch_shape):
        length = lengths[index]
        take = lambda tree: jax.tree_util.tree_map(lambda a: a[index], tree)  # noqa: E731
        ys_one, final_one = python_loop(cell, params, xs[:length][(slice(None), *index)], take(carry), reverse)
        np.testing.assert_allclose(ys[(slice(0, length), *index)], ys_one, rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(ys[(slice(length, None), *index)]) == 0.0)
        assert_trees_close(take(final), final_one)


def test_gradient_is_exactly_zero_at_padded_steps(cell):
    params, xs, carry = make_problem(cell, (3,))
    lengths = np.array([2, 6, 4])
    _, (_, grad_xs, _) = loss_and_grads(cell, params, xs, carry, jnp.asarray(lengths), reverse=True)
    padded = np.arange(SEQ_LEN)[:, None] >= lengths[None, :]
    assert np.all(np.asarray(grad_xs)[padded] == 0.0)
    assert np.all(np.any(np.asarray(grad_xs)[~padded] != 0.0, axis=-1))


def test_time_axis_one_is_the_transposed_problem(cell):
    params, xs, carry = make_problem(cell, (2,))
    ys_batch_major, final = rnnlab.scan(cell, params, jnp.swapaxes(xs, 0, 1), carry=carry, time_axis=1)
    ys, expected_final = python_loop(cell, params, xs, carry)
    assert_trees_close((ys_batch_major, final), (jnp.swapaxes(ys, 0, 1), expected_final))


def test_lengths_may_be_traced_under_jit(cell):
    params, xs, carry = make_problem(cell, (2,))
    run = jax.jit(lambda lengths: rnnlab.scan(cell, params, xs, carry=carry, lengths=lengths))
    ys, final = run(jnp.array([3, 6]))
    ys_short, final_short = python_loop(cell, params, xs[:3, :1], jax.tree_util.tree_map(lambda a: a[:1], carry))
    np.testing.assert_allclose(ys[:3, :1], ys_short, rtol=1e-5, atol=1e-6)
    assert_trees_close(jax.tree_util.tree_map(lambda a: a[:1], final), final_short)


# ---- Stack: several layers, bidirectional, dropout ----


@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidirectional", "bidirectional"])
def test_stack_matches_manual_composition_of_scans(cell, bidirectional):
    stack = rnnlab.Stack.repeat(cell, 2, bidirectional=bidirectional)
    params = stack.init(jax.random.PRNGKey(1), INPUT_SIZE)
    xs = jax.random.normal(jax.random.PRNGKey(2), (SEQ_LEN, 3, INPUT_SIZE))
    lengths = jnp.array([6, 1, 4])
    ys, finals = stack(params, xs, lengths=lengths)

    layer_inputs, expected_finals = xs, []
    for layer_params in params:
        if bidirectional:
            ys_f, final_f = rnnlab.scan(cell, layer_params["forward"], layer_inputs, lengths=lengths)
            ys_b, final_b = rnnlab.scan(cell, layer_params["backward"], layer_inputs, lengths=lengths, reverse=True)
            layer_inputs = jnp.concatenate([ys_f, ys_b], axis=-1)
            expected_finals.append((final_f, final_b))
        else:
            layer_inputs, final = rnnlab.scan(cell, layer_params, layer_inputs, lengths=lengths)
            expected_finals.append(final)
    assert_trees_close((ys, finals), (layer_inputs, tuple(expected_finals)))


def test_stack_dropout_zeroes_and_rescales_between_layers():
    """A second layer that copies its input (linear RNN, w_x = I, w_h = 0) exposes the dropped first-layer output:
    every entry is 0 or the undropped value / (1 - p), and the dropped fraction is p (4σ binomial tolerance)."""
    rate, hidden = 0.25, 5
    stack = rnnlab.Stack((rnnlab.LSTM(hidden), rnnlab.RNN(hidden, activation="linear")), dropout=rate)
    params = stack.init(jax.random.PRNGKey(0), INPUT_SIZE)
    copy = {"w_x": jnp.eye(hidden), "w_h": jnp.zeros((hidden, hidden)), "b": jnp.zeros(hidden)}
    params = (params[0], copy)
    xs = jax.random.normal(jax.random.PRNGKey(1), (SEQ_LEN, 64, INPUT_SIZE))
    first_layer, _ = rnnlab.scan(stack.layers[0], params[0], xs)

    no_dropout, _ = stack(params, xs)
    np.testing.assert_allclose(no_dropout, first_layer, rtol=1e-6, atol=1e-7)
    dropped, _ = stack(params, xs, key=jax.random.PRNGKey(3))
    kept = np.asarray(dropped) != 0.0
    np.testing.assert_allclose(np.asarray(dropped)[kept], np.asarray(first_layer)[kept] / (1 - rate), rtol=1e-6)
    n = kept.size
    assert abs((1 - kept.mean()) - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    again, _ = stack(params, xs, key=jax.random.PRNGKey(4))
    assert np.any((np.asarray(again) != 0.0) != kept)


def test_remat_near_sqrt_is_the_divisor_nearest_the_square_root():
    # 100 000 = 2^5·5^5: its divisors nearest 316.2 are 250 and 400; a prime has only 1 and itself
    assert [rnnlab.remat_near_sqrt(t) for t in (100_000, 10_000, 1_000, 12, 13, 1)] == [250, 100, 25, 3, 1, 1]
    with pytest.raises(ValueError, match="seq_len must be at least 1"):
        rnnlab.remat_near_sqrt(0)


def test_stack_remat_and_grads_match_no_remat():
    stack = rnnlab.Stack.repeat(rnnlab.GRU(4), 2, bidirectional=True)
    params = stack.init(jax.random.PRNGKey(0), INPUT_SIZE)
    xs = jax.random.normal(jax.random.PRNGKey(1), (SEQ_LEN, 2, INPUT_SIZE))

    def loss_and_grads(remat):
        loss = lambda params, xs: jnp.sum(jnp.sin(stack(params, xs, remat=remat)[0]))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, xs)

    assert_trees_close(loss_and_grads(remat=3), loss_and_grads(remat=None))


# ---- Bad input: the right error, at trace time, with the argument and shapes in the message ----


@pytest.mark.parametrize("library_cell", [rnnlab.RNN(5), rnnlab.LSTM(5), rnnlab.GRU(5)], ids=["rnn", "lstm", "gru"])
def test_wrong_input_size_names_both_sizes(library_cell):
    params = library_cell.init(jax.random.PRNGKey(0), INPUT_SIZE)
    xs = jnp.zeros((SEQ_LEN, 2, INPUT_SIZE + 4))
    with pytest.raises(ValueError, match=rf"xs has shape \(6, 2, 7\).*input size {INPUT_SIZE}.*got 7"):
        rnnlab.scan(library_cell, params, xs)


LSTM_CELL = rnnlab.LSTM(hidden_size=5)
LSTM_PARAMS = LSTM_CELL.init(jax.random.PRNGKey(0), INPUT_SIZE)
GOOD_XS = jnp.zeros((SEQ_LEN, 2, INPUT_SIZE))
BAD_INPUTS = {
    "rank1_xs": (dict(xs=jnp.zeros((INPUT_SIZE,))), ValueError, r"xs has shape \(3,\).*at least 2 axes"),
    "empty_sequence": (dict(xs=jnp.zeros((0, 2, INPUT_SIZE))), ValueError, r"T must be at least 1"),
    "integer_xs": (dict(xs=jnp.zeros((SEQ_LEN, 2, INPUT_SIZE), jnp.int32)), TypeError, r"xs must have a floating"),
    "lengths_zero": (dict(lengths=jnp.array([0, 3])), ValueError, r"lengths must lie in \[1, T\] = \[1, 6\]"),
    "lengths_above_T": (dict(lengths=jnp.array([7, 3])), ValueError, r"lengths must lie in \[1, T\] = \[1, 6\]"),
    "lengths_wrong_shape": (dict(lengths=jnp.array([3, 3, 3])), ValueError, r"lengths has shape \(3,\).*\(2,\)"),
    "lengths_float": (dict(lengths=jnp.array([3.0, 3.0])), TypeError, r"lengths must hold integers"),
    "carry_wrong_structure": (dict(carry=jnp.zeros((2, 5))), TypeError, r"carry has structure"),
    "carry_wrong_shape": (dict(carry=(jnp.zeros((3, 5)), jnp.zeros((3, 5)))), ValueError,
                          r"carry has a leaf of shape \(3, 5\); expected \(2, 5\)"),
    "bad_time_axis": (dict(time_axis=2), ValueError, r"time_axis=2 is not a time axis"),
    "remat_not_dividing_T": (dict(remat=4), ValueError, r"remat=4 must divide the sequence length T=6"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_with_useful_message(case):
    overrides, error, message = BAD_INPUTS[case]
    kwargs = dict(xs=GOOD_XS, **overrides) if "xs" not in overrides else dict(overrides)
    with pytest.raises(error, match=message):
        jax.jit(lambda params: rnnlab.scan(LSTM_CELL, params, **kwargs))(LSTM_PARAMS)


def test_float32_weights_on_bfloat16_inputs_promote_as_one_step_does(cell):
    """float32 parameters on bfloat16 inputs (a data pipeline in bfloat16, say): each step promotes to float32, so
    the default carry is float32 (it had been the inputs' dtype, and `jax.lax.scan` refused the carry's change of
    type). The outputs and gradients are bit for bit those of the inputs cast to float32 first, with lengths and in
    `models.ManyToOne`'s last-output path too: a built-in cell casts its arguments to the carry's dtype, so its fused
    recurrence (the native kernels) runs them, 3-4x faster than the promoting plain step (LSTM, GRU, tanh RNN at
    16,1000,32,128). A bfloat16 carry of the caller's is refused by name."""
    params = cell.init(jax.random.PRNGKey(0), 3)
    xs = jax.random.normal(jax.random.PRNGKey(1), (7, 2, 3)).astype(jnp.bfloat16)
    lengths = jnp.asarray([7, 4])
    wide = xs.astype(jnp.float32)
    ys, final = rnnlab.scan(cell, params, xs, lengths=lengths)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves((ys, final))} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(ys, rnnlab.scan(cell, params, wide, lengths=lengths)[0])
    loss = lambda p, x: jnp.sum(jnp.sin(rnnlab.scan(cell, p, x, lengths=lengths)[0]))  # noqa: E731
    for got, want in zip(jax.tree_util.tree_leaves(jax.grad(loss)(params, xs)),
                         jax.tree_util.tree_leaves(jax.grad(loss)(params, wide))):
        np.testing.assert_array_equal(got, want)
    model = rnnlab.models.ManyToOne(cell, 2, remat=7)
    model_params = model.init(jax.random.PRNGKey(2), 3)
    np.testing.assert_array_equal(model(model_params, xs, lengths=lengths), model(model_params, wide, lengths=lengths))
    narrow = jax.tree_util.tree_map(lambda leaf: leaf.astype(jnp.bfloat16), cell.initial_carry((2,)))
    with pytest.raises(TypeError, match="carry has dtypes"):
        rnnlab.scan(cell, params, xs, carry=narrow)


def test_a_wider_carry_of_the_callers_leaves_a_narrow_cells_own_arithmetic():
    """A bfloat16 LSTM given a float32 carry: its step projects the inputs in bfloat16 and promotes only where the
    carry enters, so params and xs are not cast up front (that moved ys by 6e-4); the numbers are those of the
    projection in bfloat16 and `jax.lax.scan` of the recurrence, written out here."""
    cell = rnnlab.LSTM(5)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), cell.init(jax.random.PRNGKey(0), 3))
    xs = jax.random.normal(jax.random.PRNGKey(1), (7, 2, 3)).astype(jnp.bfloat16)
    carry = cell.initial_carry((2,), jnp.float32)
    ys, _ = rnnlab.scan(cell, params, xs, carry=carry)
    _, expected = jax.lax.scan(lambda c, x: cell.recur(params, c, x), carry, cell.project_inputs(params, xs))
    np.testing.assert_array_equal(ys, expected)
