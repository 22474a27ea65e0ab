r"""Closed-form predictions that gradient-flow measurements are held against.

All rates are **log10 per step**: the slope of ``log10 ||∂L/∂h_t||`` against the lag ``T - 1 - t`` (negative:
vanishing; positive: exploding). Where a prediction is exact and where it is only an approximation is stated on each.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rnnlab.cells import GRU, LSTM, RNN
from rnnlab.scan import prepare, step_and_inputs

#: Gauss–Hermite nodes and weights for E[f(z)], z ~ N(0, 1): ∫ f(√2 u) e^{-u²} du / √π.
_NODES, _WEIGHTS = np.polynomial.hermite.hermgauss(101)
_Z, _W = np.sqrt(2.0) * _NODES, _WEIGHTS / np.sqrt(np.pi)


def gaussian_expectation(f, variance: float) -> float:
    """``E[f(√variance · z)]`` for ``z ~ N(0, 1)``, by 101-point Gauss–Hermite quadrature."""
    return float(np.sum(_W * f(np.sqrt(variance) * _Z)))


def linear_orthogonal_log10(gain: float, lags) -> np.ndarray:
    """A linear RNN ``h' = x W_x + h W + b`` with ``W = gain · Q``, ``Q`` orthogonal: every singular value of
    ``∂h_T/∂h_t`` is ``gain^(T-t)``, so ``log10 ||∂L/∂h_t|| = lag · log10 gain + log10 ||∂L/∂h_T||``. **Exact**, at
    any size, for any input.
    """
    return np.asarray(lags, dtype=float) * np.log10(gain)


def tanh_fixed_point(gain: float, input_variance: float = 0.0, bias_variance: float = 0.0,
                     iterations: int = 500) -> float:
    r"""The stationary pre-activation variance ``q*`` of a tanh RNN in mean-field theory:

    .. math:: q^* = g^2 \, E[\tanh(\sqrt{q^*} z)^2] + \sigma_x^2 + \sigma_b^2

    where ``σ_x²`` is the variance the input adds to each pre-activation (``E[(x W_x)_i²]``) and ``σ_b²`` the bias
    variance. Found by fixed-point iteration from ``q = 1`` (the map is a contraction onto its stable root).
    """
    q = 1.0
    for _ in range(iterations):
        q = gain**2 * gaussian_expectation(lambda a: np.tanh(a) ** 2, q) + input_variance + bias_variance
    return q


def tanh_chi(gain: float, input_variance: float = 0.0, bias_variance: float = 0.0) -> float:
    r"""Mean-field per-step growth factor of the squared gradient norm of a tanh RNN with ``W ~ N(0, g²/H)``:

    .. math:: \chi = g^2 \, E[\tanh'(\sqrt{q^*} z)^2]

    (Poole et al. 2016; Chen, Pennington & Schoenholz 2018 for recurrent networks). ``χ < 1``: gradients vanish;
    ``χ > 1``: they explode; ``χ = 1`` is the edge of chaos (at ``g = 1`` with no input or bias).

    **Holds** in the limit of large hidden size for i.i.d. Gaussian weights, and, to the same order, for ``g·Q`` with
    ``Q`` orthogonal (χ depends only on second moments). **Approximates**: finite ``H`` (fluctuations of order
    ``1/√H``), the tied weights of a real RNN (mean-field treats every step's weights as fresh), and the transient
    before the state reaches its stationary variance.
    """
    q = tanh_fixed_point(gain, input_variance, bias_variance)
    return gain**2 * gaussian_expectation(lambda a: (1.0 - np.tanh(a) ** 2) ** 2, q)


def tanh_rate(gain: float, input_variance: float = 0.0, bias_variance: float = 0.0) -> float:
    """``½ log10 χ``: the mean-field log10 rate per step of ``||∂L/∂h_t||`` for a tanh RNN (see `tanh_chi`)."""
    return 0.5 * float(np.log10(tanh_chi(gain, input_variance, bias_variance)))


def _preactivations(cell, params, xs):
    """The pre-activations ``x_t W_x + b + h_{t-1} W_h`` of a built-in cell along the trajectory: ``[T, *batch, G·H]``."""
    xs, carry, _ = prepare(cell, params, xs)
    step, inputs = step_and_inputs(cell, params, xs)

    def advance(carry, projected_x):
        h = cell.hidden(carry)
        recurrent = h @ params["w_h"] + params.get("b_h", 0.0)
        new_carry, _ = step(carry, projected_x)
        return new_carry, (projected_x, recurrent)

    _, (projected, recurrent) = jax.lax.scan(advance, carry, inputs)
    return projected, recurrent


def gate_path_rate(cell, params, xs) -> jax.Array:
    """Mean ``log10`` of the keep gate along the trajectory of ``xs``: the LSTM's forget gate ``σ(f)`` or the GRU's
    update gate ``z``.

    The LSTM's cell-state path gives ``∂c_T/∂c_t ⊇ Π_{s>t} diag σ(f_s)``: this is its log10 rate per step. The same
    holds for the GRU's direct path ``h' = … + z ⊙ h``. **Exact** for that one path. It only **approximates** the
    full gradient, which also flows through the gates and the candidate / output paths: those paths add to the keep
    path, so the measured decay is usually slower (the measured rate lies above this one), by more at high gain.
    """
    projected, recurrent = _preactivations(cell, params, xs)
    gates = dict(zip(cell.gates, jnp.split(projected + recurrent, len(cell.gates), axis=-1)))
    keep = gates["forget"] if isinstance(cell, LSTM) else gates["update"]
    return jnp.mean(jnp.log10(jax.nn.sigmoid(keep)))


@functools.partial(jax.jit, static_argnums=0)
def _gate_path_rates(cell, params, xs):
    return jax.vmap(lambda p, x: gate_path_rate(cell, p, x))(params, xs)


def input_variance(params, input_std: float) -> float:
    """``E[(x W_x + b)_i²]`` per pre-activation unit for inputs ``x ~ N(0, input_std²)``, from the actual weights."""
    w_x = np.asarray(params["w_x"])
    return float(input_std**2 * np.mean(np.sum(w_x**2, axis=0)) + np.mean(np.asarray(params["b"]) ** 2))


def predicted_rates(cell, params, gains, xs, input_std: float) -> np.ndarray:
    """The theory's log10 rate per step for each configuration of a built-in cell, or ``nan`` where there is none.

    ``params``, ``gains [configs]`` and ``xs [configs, T, *batch, I]`` carry a leading configuration axis.

    - tanh RNN: `tanh_rate` at each gain with the measured input variance (mean-field; approximate).
    - linear RNN with orthogonal recurrent weights: ``log10 gain`` (exact).
    - LSTM / GRU: `gate_path_rate` along ``xs`` (the keep-gate path; approximate).
    - ReLU RNN: ``nan`` — no closed form (with identity init, ``log10 gain`` bounds the rate from above).
    """
    gains = np.asarray(gains, np.float64)
    if type(cell) is RNN and cell.activation == "tanh":
        return np.asarray([
            tanh_rate(gain, input_variance(jax.tree_util.tree_map(lambda leaf: leaf[i], params), input_std))
            for i, gain in enumerate(gains)
        ])
    if type(cell) is RNN and cell.activation == "linear":
        return np.log10(gains)
    if type(cell) in (LSTM, GRU):
        return np.asarray(_gate_path_rates(cell, params, xs), np.float64)
    return np.full(gains.shape, np.nan)
