"""Initialisers for recurrent cells.

Every initialiser here is a frozen dataclass with the `jax.nn.initializers` call signature
``init(key, shape, dtype) -> array``, so two cells built with the same initialiser settings compare equal and hash
equal (a cell is a static `jit` argument; equal cells share one compiled program). Any plain
`jax.nn.initializers`-style callable works wherever these do.

Weight matrices use the ``[fan_in, fan_out]`` layout (``x @ w``). Gated cells call the weight initialisers once per
gate block (``[I, H]`` and ``[H, H]``), so ``orthogonal()`` gives an orthogonal matrix for every gate.

Gate-bias initialisers (`forget_bias`, `chrono`) also receive the cell's gate names, so one initialiser serves the
LSTM (gates ``input, forget, cell, output``) and the GRU (gates ``reset, update, new``, where the update gate ``z``
keeps the old state: ``h' = (1 - z) n + z h``, so it plays the forget gate's role).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

#: The gate that keeps the old state, per gated cell; a positive bias on it lengthens memory.
_KEEP_GATES = ("forget", "update")


def _check_matrix(name: str, shape: Sequence[int]) -> None:
    if len(shape) != 2:
        raise ValueError(f"{name} initialises matrices; got shape {tuple(shape)}, expected (fan_in, fan_out).")


@dataclasses.dataclass(frozen=True)
class orthogonal:
    """``gain · Q`` with ``Q`` a uniformly random (Haar) orthogonal matrix (Saxe et al. 2014).

    At gain 1 every singular value of ``Q`` is 1, so a linear RNN neither shrinks nor grows its state.
    """

    gain: float = 1.0

    def __call__(self, key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        _check_matrix("orthogonal", shape)
        return jax.nn.initializers.orthogonal(scale=self.gain)(key, tuple(shape), dtype)


@dataclasses.dataclass(frozen=True)
class identity:
    """``gain · I``: the IRNN initialisation of Le, Jaitly & Hinton (2015), "A Simple Way to Initialize Recurrent
    Networks of Rectified Linear Units". Needs a square matrix."""

    gain: float = 1.0

    def __call__(self, key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        del key
        _check_matrix("identity", shape)
        if shape[0] != shape[1]:
            raise ValueError(f"identity needs a square matrix; got shape {tuple(shape)}.")
        return self.gain * jnp.eye(shape[0], dtype=dtype)


@dataclasses.dataclass(frozen=True)
class scaled_normal:
    """Entries i.i.d. ``N(0, gain² / fan_in)``, with ``fan_in = shape[0]``.

    For a recurrent matrix this is the random-matrix ensemble of mean-field theory (Poole et al. 2016): its spectral
    radius tends to ``gain`` as the size grows. ``scaled_normal(1.0)`` is LeCun-normal without truncation.
    """

    gain: float = 1.0

    def __call__(self, key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        _check_matrix("scaled_normal", shape)
        std = self.gain / jnp.sqrt(jnp.asarray(shape[0], dtype))
        return std * jax.random.normal(key, tuple(shape), dtype)


@dataclasses.dataclass(frozen=True)
class constant:
    """Every entry equal to ``value`` (zeros by default)."""

    value: float = 0.0

    def __call__(self, key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        del key
        return jnp.full(tuple(shape), self.value, dtype)


zeros = constant(0.0)


def _require_gates(gates: Sequence[str] | None, name: str) -> Sequence[str]:
    # A cell without a keep gate (the plain RNN) would silently get an all-zero bias.
    if gates is None or not any(g in _KEEP_GATES for g in gates):
        raise TypeError(f"{name} is a gate-bias initialiser: use it as bias_init of a cell with a forget or update "
                        f"gate (LSTM, GRU); got gates {gates}.")
    return gates


@dataclasses.dataclass(frozen=True)
class forget_bias:
    """Bias ``value`` on the gate that keeps the old state (LSTM forget gate; GRU update gate), zero elsewhere.

    Gers, Schmidhuber & Cummins (2000) and Jozefowicz et al. (2015) recommend 1 for the LSTM.
    """

    value: float = 1.0
    gate_aware = True

    def __call__(self, key, shape, dtype=jnp.float32, gates=None):
        del key
        gates = _require_gates(gates, "forget_bias")
        hidden_size = shape[0] // len(gates)
        rows = [jnp.full((hidden_size,), self.value if g in _KEEP_GATES else 0.0, dtype) for g in gates]
        return jnp.concatenate(rows)


@dataclasses.dataclass(frozen=True)
class chrono:
    """Chrono initialisation (Tallec & Ollivier 2018, "Can recurrent neural networks warp time?").

    The keep gate's bias is ``log(u)``, ``u ~ U[1, max_len - 1]``, so its time constants spread over ``[1, max_len]``;
    for the LSTM the input gate's bias is its negative, ``b_i = -b_f``. Other gates get zero.
    """

    max_len: float
    gate_aware = True

    def __call__(self, key, shape, dtype=jnp.float32, gates=None):
        gates = _require_gates(gates, "chrono")
        if self.max_len <= 2:
            raise ValueError(f"chrono needs max_len > 2; got {self.max_len}.")
        hidden_size = shape[0] // len(gates)
        keep = jnp.log(jax.random.uniform(key, (hidden_size,), dtype, 1.0, self.max_len - 1.0))
        rows = {g: jnp.zeros((hidden_size,), dtype) for g in gates}
        for g in gates:
            if g in _KEEP_GATES:
                rows[g] = keep
        if "input" in rows:
            rows["input"] = -keep
        return jnp.concatenate([rows[g] for g in gates])


def init_bias(bias_init: Initializer, key: jax.Array, gates: Sequence[str], hidden_size: int, dtype) -> jax.Array:
    """A ``[len(gates) * hidden_size]`` bias, gate-major; gate-aware initialisers are told the gate names."""
    shape = (len(gates) * hidden_size,)
    if getattr(bias_init, "gate_aware", False):
        return bias_init(key, shape, dtype, gates=tuple(gates))
    return bias_init(key, shape, dtype)
