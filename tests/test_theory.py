"""`rnnlab.theory`: quadrature against closed forms and Monte Carlo, and mean-field against measurement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnlab
from rnnlab import gradflow, sweep, theory


def test_gaussian_expectation_closed_forms():
    assert theory.gaussian_expectation(lambda a: a**2, 2.5) == pytest.approx(2.5, rel=1e-12)
    assert theory.gaussian_expectation(lambda a: np.cos(3 * a), 0.7) == pytest.approx(np.exp(-9 * 0.7 / 2), rel=1e-10)


@pytest.mark.parametrize("gain", [0.3, 0.5, 0.9])
def test_chi_without_input_is_gain_squared_below_the_edge(gain):
    """Below g = 1 with no input or bias the fixed point is q* = 0, where tanh' = 1: χ = g²."""
    assert theory.tanh_fixed_point(gain) == pytest.approx(0.0, abs=1e-6)
    assert theory.tanh_chi(gain) == pytest.approx(gain**2, rel=1e-5)


@pytest.mark.parametrize("gain, input_variance", [(1.5, 0.0), (1.0, 0.5), (2.0, 0.1)])
def test_fixed_point_and_chi_against_monte_carlo(gain, input_variance):
    q = theory.tanh_fixed_point(gain, input_variance)
    z = np.random.default_rng(0).standard_normal(2_000_000)
    assert q == pytest.approx(gain**2 * np.mean(np.tanh(np.sqrt(q) * z) ** 2) + input_variance, rel=2e-3)
    chi_mc = gain**2 * np.mean((1 - np.tanh(np.sqrt(q) * z) ** 2) ** 2)
    assert theory.tanh_chi(gain, input_variance) == pytest.approx(chi_mc, rel=2e-3)


@pytest.mark.parametrize("gain", [0.7, 1.0, 1.4])
def test_mean_field_rate_matches_measured_tanh_rnn_at_large_hidden_size(gain):
    """Gaussian W ~ N(0, g²/H), H = 512: the measured slope of log10 ||∂L/∂h_t|| is within 0.01 per step of
    ½ log10 χ (finite-size and tied-weight effects are of order 1/√H)."""
    hidden, input_std = 512, 0.3
    cell = rnnlab.RNN(hidden, recurrent_init=rnnlab.init.scaled_normal(gain))
    params = cell.init(jax.random.PRNGKey(0), input_size=16)
    xs = input_std * jax.random.normal(jax.random.PRNGKey(1), (300, 8, 16))
    measured = np.asarray(gradflow.grad_norms(cell, params, xs))
    lags = 299 - np.arange(300)
    rate = sweep.fit_rate(lags[:250], measured[:250])  # skip the transient while the state variance settles
    predicted = theory.tanh_rate(gain, theory.input_variance(params, input_std))
    assert rate == pytest.approx(predicted, abs=0.01)


@pytest.mark.parametrize("cell_type, bias_name", [(rnnlab.LSTM, "b"), (rnnlab.GRU, "b_x")])
def test_gate_path_rate_closed_form(cell_type, bias_name):
    """With zero weights every keep gate is σ(bias): the path rate is log10 σ(bias) exactly (in float64, so the
    check is to 1e-12 rather than to float32's rounding of σ, log10 and the mean)."""
    cell = cell_type(4, bias_init=rnnlab.init.forget_bias(2.0))
    with jax.enable_x64(True):
        params = cell.init(jax.random.PRNGKey(0), 3, jnp.float64)
        params = {**params, "w_x": jnp.zeros_like(params["w_x"]), "w_h": jnp.zeros_like(params["w_h"])}
        xs = jax.random.normal(jax.random.PRNGKey(1), (7, 2, 3), jnp.float64)
        rate = theory.gate_path_rate(cell, params, xs)
        assert rate.dtype == jnp.float64
    assert float(rate) == pytest.approx(np.log10(1 / (1 + np.exp(-2.0))), rel=1e-12)


def test_predicted_rates_linear_is_log_gain_and_relu_has_none():
    gains = np.array([0.5, 2.0])
    linear = rnnlab.RNN(4, activation="linear")
    np.testing.assert_allclose(theory.predicted_rates(linear, None, gains, None, 1.0), np.log10(gains))
    assert np.all(np.isnan(theory.predicted_rates(rnnlab.RNN(4, activation="relu"), None, gains, None, 1.0)))
