"""The cells: one step against the equations of the issue written in float64 numpy, parameter layouts, the protocol,
configuration equality, and bad configuration or input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnlab

INPUT_SIZE = 3


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def reference_step(cell, params, carry, x):
    """One step of ``cell`` from the equations in the issue, in float64 numpy: ``(new_carry, y)``."""
    p = {name: np.asarray(value, np.float64) for name, value in params.items()}
    x = np.asarray(x, np.float64)
    if isinstance(cell, rnnlab.LSTM):
        h, c = (np.asarray(a, np.float64) for a in carry)
        i, f, g, o = np.split(x @ p["w_x"] + h @ p["w_h"] + p["b"], 4, axis=-1)
        c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h_new = sigmoid(o) * np.tanh(c_new)
        return (h_new, c_new), h_new
    h = np.asarray(carry, np.float64)
    if isinstance(cell, rnnlab.GRU):
        x_r, x_z, x_n = np.split(x @ p["w_x"] + p["b_x"], 3, axis=-1)
        h_r, h_z, h_n = np.split(h @ p["w_h"] + p["b_h"], 3, axis=-1)
        r, z = sigmoid(x_r + h_r), sigmoid(x_z + h_z)
        n = np.tanh(x_n + r * h_n)
        h_new = (1 - z) * n + z * h
        return h_new, h_new
    activations = {"tanh": np.tanh, "relu": lambda a: np.maximum(a, 0.0), "linear": lambda a: a}
    h_new = activations[cell.activation](x @ p["w_x"] + h @ p["w_h"] + p["b"])
    return h_new, h_new


def random_problem(cell, batch_shape=(4,), seed=0):
    """Parameters with non-zero biases, an input ``[*batch, I]`` and a non-zero carry."""
    key_p, key_x, key_b, key_c = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = cell.init(key_p, INPUT_SIZE)
    params = {name: value + (0.3 * jax.random.normal(key_b, value.shape) if name.startswith("b") else 0.0)
              for name, value in params.items()}
    x = jax.random.normal(key_x, (*batch_shape, INPUT_SIZE))
    carry = jax.tree_util.tree_map(lambda a: 0.5 * jax.random.normal(key_c, a.shape), cell.initial_carry(batch_shape))
    return params, x, carry


def test_one_step_matches_the_equations(cell):
    params, x, carry = random_problem(cell)
    new_carry, y = cell(params, carry, x)
    expected_carry, expected_y = reference_step(cell, params, carry, x)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6), new_carry,
                           expected_carry)


def test_output_is_the_hidden_part_of_the_new_carry(cell):
    params, x, carry = random_problem(cell, batch_shape=(2, 3))
    new_carry, y = cell(params, carry, x)
    assert y.shape == (2, 3, cell.hidden_size)
    np.testing.assert_array_equal(y, cell.hidden(new_carry))


def test_custom_activation_callable():
    cell = rnnlab.RNN(hidden_size=4, activation=jnp.sin)
    params, x, carry = random_problem(cell)
    _, y = cell(params, carry, x)
    p = {name: np.asarray(value, np.float64) for name, value in params.items()}
    expected = np.sin(np.asarray(x, np.float64) @ p["w_x"] + np.asarray(carry, np.float64) @ p["w_h"] + p["b"])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "cell, shapes",
    [
        (rnnlab.RNN(5), {"w_x": (3, 5), "w_h": (5, 5), "b": (5,)}),
        (rnnlab.LSTM(5), {"w_x": (3, 20), "w_h": (5, 20), "b": (20,)}),
        (rnnlab.GRU(5), {"w_x": (3, 15), "w_h": (5, 15), "b_x": (15,), "b_h": (15,)}),
    ],
    ids=["rnn", "lstm", "gru"],
)
def test_parameter_layouts(cell, shapes):
    params = cell.init(jax.random.PRNGKey(0), INPUT_SIZE)
    assert {name: value.shape for name, value in params.items()} == shapes
    assert all(value.dtype == jnp.float32 for value in params.values())


def test_initial_carry_shapes():
    assert rnnlab.RNN(5).initial_carry((2, 3)).shape == (2, 3, 5)
    h, c = rnnlab.LSTM(5).initial_carry((2,))
    assert h.shape == c.shape == (2, 5) and not np.any(np.asarray(h)) and not np.any(np.asarray(c))
    assert rnnlab.LSTM(5).hidden((h, c + 1.0)) is h


def test_init_is_deterministic_and_honours_dtype(cell):
    first = cell.init(jax.random.PRNGKey(7), INPUT_SIZE)
    second = cell.init(jax.random.PRNGKey(7), INPUT_SIZE)
    other = cell.init(jax.random.PRNGKey(8), INPUT_SIZE)
    jax.tree_util.tree_map(np.testing.assert_array_equal, first, second)
    assert not np.array_equal(first["w_h"], other["w_h"])
    with jax.enable_x64(True):
        params = cell.init(jax.random.PRNGKey(7), INPUT_SIZE, jnp.float64)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(params))


def test_equal_configurations_are_equal_hash_equal_and_compile_once():
    def make():
        return rnnlab.LSTM(8, recurrent_init=rnnlab.init.orthogonal(0.9), bias_init=rnnlab.init.chrono(50))

    assert make() == make() and hash(make()) == hash(make())
    assert make() != rnnlab.LSTM(8, recurrent_init=rnnlab.init.orthogonal(0.8), bias_init=rnnlab.init.chrono(50))
    assert rnnlab.RNN(8, activation="relu") != rnnlab.RNN(8, activation="tanh")
    assert rnnlab.RNN(8) != rnnlab.GRU(8)

    traces = []

    def step(cell, params, carry, x):
        traces.append(cell)  # runs only while tracing
        return cell(params, carry, x)

    step = jax.jit(step, static_argnums=0)
    params = make().init(jax.random.PRNGKey(0), INPUT_SIZE)
    carry, x = make().initial_carry((2,)), jnp.ones((2, INPUT_SIZE))
    step(make(), params, carry, x)
    step(make(), params, carry, x)
    assert len(traces) == 1


@pytest.mark.parametrize("hidden_size", [0, -3, 2.5, "8"])
@pytest.mark.parametrize("cell_type", [rnnlab.RNN, rnnlab.LSTM, rnnlab.GRU], ids=["rnn", "lstm", "gru"])
def test_bad_hidden_size(cell_type, hidden_size):
    with pytest.raises(ValueError, match=rf"hidden_size must be a positive int, got {hidden_size!r}"):
        cell_type(hidden_size=hidden_size)


def test_bad_activation():
    with pytest.raises(ValueError, match=r"activation must be one of \['linear', 'relu', 'tanh'\].*'sigmoidal'"):
        rnnlab.RNN(4, activation="sigmoidal")
    with pytest.raises(TypeError, match=r"activation must be a name or a callable, got 3"):
        rnnlab.RNN(4, activation=3)


def test_bad_input_size_at_init(cell):
    with pytest.raises(ValueError, match=r"input_size must be a positive int, got 0"):
        cell.init(jax.random.PRNGKey(0), 0)


def test_step_rejects_wrong_input_size_and_integer_input(cell):
    params, x, carry = random_problem(cell)
    with pytest.raises(ValueError, match=rf"x has shape \(4, 7\).*input size {INPUT_SIZE}.*got 7"):
        cell(params, carry, jnp.ones((4, 7)))
    with pytest.raises(TypeError, match=r"x must have a floating dtype, got int32"):
        cell(params, carry, x.astype(jnp.int32))


def test_stack_configuration():
    stack = rnnlab.Stack.repeat(rnnlab.GRU(4), 3, bidirectional=True, dropout=0.1)
    assert stack == rnnlab.Stack([rnnlab.GRU(4)] * 3, bidirectional=True, dropout=0.1)
    assert hash(stack) == hash(rnnlab.Stack([rnnlab.GRU(4)] * 3, bidirectional=True, dropout=0.1))
    params = stack.init(jax.random.PRNGKey(0), INPUT_SIZE)
    assert [p["forward"]["w_x"].shape for p in params] == [(3, 12), (8, 12), (8, 12)]
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\), got 1.0"):
        rnnlab.Stack.repeat(rnnlab.GRU(4), 2, dropout=1.0)
    with pytest.raises(ValueError, match=r"layers must hold at least one cell"):
        rnnlab.Stack(())
    with pytest.raises(ValueError, match=r"params has 2 layers; this Stack has 3"):
        stack(params[:2], jnp.ones((2, 1, INPUT_SIZE)))
