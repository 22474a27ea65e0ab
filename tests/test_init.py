"""`rnnlab.init` against closed forms: singular values, identity, the N(0, gain²/fan_in) variance, and which gate rows
the gate-bias initialisers fill."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnlab
from rnnlab import init

KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize("shape", [(6, 6), (4, 9), (9, 4)], ids=["square", "wide", "tall"])
@pytest.mark.parametrize("gain", [0.5, 1.0, 2.0])
def test_orthogonal_has_every_singular_value_equal_to_gain(shape, gain):
    w = init.orthogonal(gain)(KEY, shape)
    assert w.shape == shape and w.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.svd(np.asarray(w, np.float64), compute_uv=False), gain, rtol=1e-5)


def test_recurrent_weights_are_orthogonal_per_gate_block():
    """Gated cells call the recurrent initialiser per gate: each [H, H] block is gain·Q, not the [H, 4H] whole."""
    hidden, gain = 6, 0.7
    params = rnnlab.LSTM(hidden, recurrent_init=init.orthogonal(gain)).init(KEY, 3)
    for block in np.split(np.asarray(params["w_h"], np.float64), 4, axis=1):
        np.testing.assert_allclose(block.T @ block, gain**2 * np.eye(hidden), atol=1e-5)


@pytest.mark.parametrize("gain", [1.0, 0.25])
def test_identity(gain):
    np.testing.assert_array_equal(init.identity(gain)(KEY, (5, 5)), gain * np.eye(5, dtype=np.float32))
    cell = rnnlab.RNN(5, activation="relu", recurrent_init=init.identity(gain))  # the IRNN
    np.testing.assert_array_equal(cell.init(KEY, 3)["w_h"], gain * np.eye(5, dtype=np.float32))


@pytest.mark.parametrize("gain", [0.5, 1.5])
def test_scaled_normal_variance_is_gain_squared_over_fan_in(gain):
    """n = 200·500 samples: the sample variance has relative standard error √(2/n) ≈ 0.45%, the mean standard error
    σ/√n; both are checked at 5 standard errors."""
    fan_in, fan_out = 200, 500
    w = np.asarray(init.scaled_normal(gain)(KEY, (fan_in, fan_out)), np.float64)
    n, variance = w.size, gain**2 / fan_in
    assert abs(w.var() / variance - 1) < 5 * np.sqrt(2 / n)
    assert abs(w.mean()) < 5 * np.sqrt(variance / n)


def test_constant():
    np.testing.assert_array_equal(init.constant(0.3)(KEY, (2, 3)), np.full((2, 3), 0.3, np.float32))


def gate_rows(bias, n_gates):
    return dict(enumerate(np.split(np.asarray(bias), n_gates)))


@pytest.mark.parametrize("value", [1.0, 2.5])
def test_forget_bias_fills_the_keep_gate_only(value):
    hidden = 4
    lstm = rnnlab.LSTM(hidden, bias_init=init.forget_bias(value)).init(KEY, 3)
    i, f, g, o = gate_rows(lstm["b"], 4).values()  # LSTM gate order (i, f, g, o)
    np.testing.assert_array_equal(f, np.full(hidden, value, np.float32))
    assert not np.any(i) and not np.any(g) and not np.any(o)

    gru = rnnlab.GRU(hidden, bias_init=init.forget_bias(value)).init(KEY, 3)
    r, z, n = gate_rows(gru["b_x"], 3).values()  # GRU gate order (r, z, n); z keeps the old state
    np.testing.assert_array_equal(z, np.full(hidden, value, np.float32))
    assert not np.any(r) and not np.any(n) and not np.any(gru["b_h"])


def test_lstm_default_forget_bias_is_one():
    _, f, _, _ = gate_rows(rnnlab.LSTM(4).init(KEY, 3)["b"], 4).values()
    np.testing.assert_array_equal(f, np.ones(4, np.float32))


def test_chrono_spreads_keep_gate_time_constants_over_one_to_max_len():
    """Tallec & Ollivier (2018): b_f = log(u), u ~ U[1, max_len - 1]; for the LSTM b_i = -b_f; other gates zero."""
    hidden, max_len = 200, 50.0
    lstm = rnnlab.LSTM(hidden, bias_init=init.chrono(max_len)).init(KEY, 3)
    i, f, g, o = gate_rows(lstm["b"], 4).values()
    assert np.all(f >= 0.0) and np.all(f <= np.log(max_len - 1) + 1e-6)
    # exp(b_f) is uniform on [1, max_len - 1]: its mean lies within 5 standard errors of the midpoint.
    u = np.exp(f.astype(np.float64))
    assert abs(u.mean() - max_len / 2) < 5 * (max_len - 2) / np.sqrt(12 * hidden)
    np.testing.assert_array_equal(i, -f)
    assert not np.any(g) and not np.any(o)

    gru = rnnlab.GRU(hidden, bias_init=init.chrono(max_len)).init(KEY, 3)
    r, z, n = gate_rows(gru["b_x"], 3).values()
    assert np.all(z >= 0.0) and np.all(z <= np.log(max_len - 1) + 1e-6) and np.ptp(z) > 1.0
    assert not np.any(r) and not np.any(n)


def test_initialisers_compare_and_hash_by_configuration():
    for make in (init.orthogonal, init.identity, init.scaled_normal, init.constant, init.forget_bias, init.chrono):
        assert make(3.0) == make(3.0) and hash(make(3.0)) == hash(make(3.0))
        assert make(3.0) != make(4.0)
    assert rnnlab.GRU(4, bias_init=init.chrono(30)) == rnnlab.GRU(4, bias_init=init.chrono(30))


def test_initialisers_reject_misuse():
    with pytest.raises(ValueError, match=r"identity needs a square matrix; got shape \(3, 4\)"):
        init.identity()(KEY, (3, 4))
    with pytest.raises(ValueError, match=r"orthogonal initialises matrices; got shape \(3, 4, 5\)"):
        init.orthogonal()(KEY, (3, 4, 5))
    with pytest.raises(TypeError, match=r"forget_bias is a gate-bias initialiser.*got gates \('candidate',\)"):
        rnnlab.RNN(4, bias_init=init.forget_bias(1.0)).init(KEY, 3)
    with pytest.raises(TypeError, match=r"chrono is a gate-bias initialiser.*got gates None"):
        init.chrono(10)(KEY, (8,))
    with pytest.raises(ValueError, match=r"chrono needs max_len > 2; got 2"):
        rnnlab.LSTM(4, bias_init=init.chrono(2)).init(KEY, 3)


def test_initialisers_work_in_float64():
    with jax.enable_x64(True):
        for initialiser in (init.orthogonal(), init.identity(), init.scaled_normal(), init.constant(1.0)):
            assert initialiser(KEY, (4, 4), jnp.float64).dtype == jnp.float64
        assert rnnlab.LSTM(4, bias_init=init.chrono(20)).init(KEY, 3, jnp.float64)["b"].dtype == jnp.float64
