r"""Recurrent cells as configuration plus pure functions.

The cell protocol (all the rest of rnnlab relies on nothing else)::

    cell = rnnlab.LSTM(hidden_size=128)             # frozen dataclass: hashable, a static jit argument
    params = cell.init(key, input_size=32)          # a pytree of arrays
    carry = cell.initial_carry(batch_shape=(16,))   # a pytree; for the LSTM (h, c)
    carry, y = cell(params, carry, x_t)             # one time step, pure; x_t: [*batch, input_size]
    h = cell.hidden(carry)                          # the hidden state h_t, [*batch, hidden_size]

Optionally ``cell.project_inputs(params, xs)`` (the input matmul for all steps at once, any leading axes) together
with ``cell.recur(params, carry, projected_x)`` (the rest of one step); `rnnlab.scan` then hoists the input matmul
out of the time loop. ``cell(params, carry, x) == cell.recur(params, carry, cell.project_inputs(params, x))``.

Parameter layouts (``x @ w``, gates concatenated along the last axis in the order given) are those of the
cuDNN / PyTorch kernels, so `rnnlab.interop` converts by transposes and bias sums only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp

from rnnlab import init as initializers
from rnnlab.checks import check_float_input, check_input_size
from rnnlab.init import Initializer

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "linear": lambda z: z,
}


def _gate_blocks(initializer: Initializer, key: jax.Array, n_gates: int, shape, dtype) -> jax.Array:
    """``n_gates`` blocks of ``shape`` side by side, ``[shape[0], n_gates · shape[1]]``, one initialiser call each.

    The calls are one `jax.vmap`, so an orthogonal initialiser runs a single batched QR: several independent QRs in
    one jitted program can deadlock JAX's CPU thread pool (seen with a vmapped LSTM init).
    """
    blocks = jax.vmap(lambda k: initializer(k, shape, dtype))(jax.random.split(key, n_gates))
    return jnp.concatenate(list(blocks), axis=1)


@dataclasses.dataclass(frozen=True)
class _GatedRecurrence:
    """Shared machinery of cells with ``w_x [I, G·H]``, ``w_h [H, G·H]`` and gate-major biases.

    Subclasses set ``gates`` (their names, in layout order), ``bias_names`` (the bias vectors, each ``[G·H]``),
    and implement ``recur``.
    """

    hidden_size: int
    input_init: Initializer = initializers.scaled_normal(1.0)
    recurrent_init: Initializer = initializers.orthogonal(1.0)
    bias_init: Initializer = initializers.zeros

    gates: ClassVar[tuple[str, ...]]
    bias_names: ClassVar[tuple[str, ...]] = ("b",)

    def __post_init__(self):
        if not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {self.hidden_size!r}.")

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
        """Parameters for inputs of ``input_size`` features: ``w_x [I, G·H]``, ``w_h [H, G·H]`` and the biases.

        The weight initialisers are called once per gate block, so an orthogonal ``recurrent_init`` gives an
        orthogonal ``[H, H]`` matrix for every gate. The first bias gets ``bias_init``; any second one (GRU's ``b_h``)
        is zero.
        """
        if not isinstance(input_size, int) or input_size < 1:
            raise ValueError(f"input_size must be a positive int, got {input_size!r}.")
        hidden, n_gates = self.hidden_size, len(self.gates)
        key_x, key_h, key_b = jax.random.split(key, 3)
        w_x = _gate_blocks(self.input_init, key_x, n_gates, (input_size, hidden), dtype)
        w_h = _gate_blocks(self.recurrent_init, key_h, n_gates, (hidden, hidden), dtype)
        params = {"w_x": w_x, "w_h": w_h}
        params[self.bias_names[0]] = initializers.init_bias(self.bias_init, key_b, self.gates, hidden, dtype)
        for name in self.bias_names[1:]:
            params[name] = jnp.zeros((n_gates * hidden,), dtype)
        return params

    def initial_carry(self, batch_shape: Sequence[int] = (), dtype: Any = jnp.float32):
        return jnp.zeros((*batch_shape, self.hidden_size), dtype)

    def hidden(self, carry) -> jax.Array:
        return carry

    def input_size(self, params) -> int:
        return params["w_x"].shape[0]

    def project_inputs(self, params, xs: jax.Array) -> jax.Array:
        """``xs @ w_x + b``: ``xs [..., I] -> [..., G·H]``, for every step at once."""
        return xs @ params["w_x"] + params[self.bias_names[0]]

    def __call__(self, params, carry, x: jax.Array):
        check_float_input("x", x)
        check_input_size("x", x, self.input_size(params))
        return self.recur(params, carry, self.project_inputs(params, x))

    def _split(self, z: jax.Array) -> list[jax.Array]:
        return jnp.split(z, len(self.gates), axis=-1)


@dataclasses.dataclass(frozen=True)
class RNN(_GatedRecurrence):
    r"""Elman RNN (Elman 1990, "Finding structure in time").

    .. math:: h' = \phi(x W_x + h W_h + b)

    **Arguments:** ``hidden_size``; ``activation``: ``"tanh"``, ``"relu"``, ``"linear"`` or any callable
    ``φ``; ``input_init``, ``recurrent_init`` (orthogonal by default; `rnnlab.init.identity` gives the IRNN),
    ``bias_init``.

    **Parameters:** ``w_x [I, H]``, ``w_h [H, H]``, ``b [H]``. **Carry:** ``h [*batch, H]``; the output is ``h'``.
    """

    activation: str | Callable[[jax.Array], jax.Array] = "tanh"
    gates: ClassVar[tuple[str, ...]] = ("candidate",)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.activation, str) and self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)} or a callable, got {self.activation!r}.")
        if not isinstance(self.activation, str) and not callable(self.activation):
            raise TypeError(f"activation must be a name or a callable, got {self.activation!r}.")

    def recur(self, params, h, projected_x):
        phi = _ACTIVATIONS[self.activation] if isinstance(self.activation, str) else self.activation
        h_new = phi(projected_x + h @ params["w_h"])
        return h_new, h_new


@dataclasses.dataclass(frozen=True)
class LSTM(_GatedRecurrence):
    r"""Long short-term memory (Hochreiter & Schmidhuber 1997; forget gate: Gers et al. 2000).

    .. math::
        [i, f, g, o] = x W_x + h W_h + b \\
        c' = \sigma(f) c + \sigma(i) \tanh(g), \qquad h' = \sigma(o) \tanh(c')

    **Parameters:** ``w_x [I, 4H]``, ``w_h [H, 4H]``, ``b [4H]``, gates in the order (i, f, g, o) as in PyTorch and
    cuDNN. Default ``bias_init`` is `rnnlab.init.forget_bias(1.0)`; `rnnlab.init.chrono` is the other classic.
    **Carry:** ``(h, c)``, each ``[*batch, H]``; ``hidden(carry)`` is ``h``; the output is ``h'``.
    """

    bias_init: Initializer = initializers.forget_bias(1.0)
    gates: ClassVar[tuple[str, ...]] = ("input", "forget", "cell", "output")

    def initial_carry(self, batch_shape: Sequence[int] = (), dtype: Any = jnp.float32):
        zeros = jnp.zeros((*batch_shape, self.hidden_size), dtype)
        return zeros, zeros

    def hidden(self, carry) -> jax.Array:
        return carry[0]

    def recur(self, params, carry, projected_x):
        h, c = carry
        i, f, g, o = self._split(projected_x + h @ params["w_h"])
        c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
        return (h_new, c_new), h_new


@dataclasses.dataclass(frozen=True)
class GRU(_GatedRecurrence):
    r"""Gated recurrent unit (Cho et al. 2014), in the cuDNN / PyTorch convention (reset applied after the matmul).

    .. math::
        r = \sigma(x W_{xr} + b_{xr} + h W_{hr} + b_{hr}), \quad z = \sigma(x W_{xz} + b_{xz} + h W_{hz} + b_{hz}) \\
        n = \tanh(x W_{xn} + b_{xn} + r \odot (h W_{hn} + b_{hn})), \qquad h' = (1 - z) n + z h

    **Parameters:** ``w_x [I, 3H]``, ``w_h [H, 3H]``, ``b_x [3H]``, ``b_h [3H]``, gates in the order (r, z, n).
    ``bias_init`` fills ``b_x`` (the update gate ``z`` is the "keep" gate for `rnnlab.init.forget_bias` and
    `rnnlab.init.chrono`); ``b_h`` starts at zero. **Carry:** ``h [*batch, H]``; the output is ``h'``.
    """

    gates: ClassVar[tuple[str, ...]] = ("reset", "update", "new")
    bias_names: ClassVar[tuple[str, ...]] = ("b_x", "b_h")

    def recur(self, params, h, projected_x):
        x_r, x_z, x_n = self._split(projected_x)
        h_r, h_z, h_n = self._split(h @ params["w_h"] + params["b_h"])
        r = jax.nn.sigmoid(x_r + h_r)
        z = jax.nn.sigmoid(x_z + h_z)
        n = jnp.tanh(x_n + r * h_n)
        h_new = (1.0 - z) * n + z * h
        return h_new, h_new


def output_size(cell, params, input_size: int, dtype: Any = jnp.float32) -> int:
    """The feature size of the cell's per-step output, found by tracing one step (no computation)."""
    carry = cell.initial_carry((), dtype)
    _, y = jax.eval_shape(lambda p, c: cell(p, c, jnp.zeros((input_size,), dtype)), params, carry)
    return y.shape[-1]


@dataclasses.dataclass(frozen=True)
class Stack:
    """Several recurrent layers, optionally bidirectional, with dropout between layers: one call, as in
    ``torch.nn.LSTM(num_layers=..., bidirectional=..., dropout=...)``.

    Each layer is scanned over the whole sequence before the next (so each hoists its own input matmul). A
    bidirectional layer runs a forward and a backward copy of its cell and concatenates their outputs on the feature
    axis; with ``lengths`` the backward copy starts at each sequence's last valid step.

    **Arguments:** ``layers``: a tuple of cells, bottom first; ``bidirectional``; ``dropout``: the probability of
    zeroing each output of every layer but the last (applied only when a ``key`` is passed, i.e. in training).

    **Parameters:** a tuple with one entry per layer: the cell's parameters, or ``{"forward": ..., "backward": ...}``
    for a bidirectional layer. **Carries:** a tuple with one entry per layer, a ``(forward, backward)`` pair when
    bidirectional.
    """

    layers: tuple
    bidirectional: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("layers must hold at least one cell.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}.")

    @classmethod
    def repeat(cls, cell, num_layers: int, **kwargs) -> "Stack":
        """``num_layers`` copies of ``cell`` (each with its own parameters)."""
        return cls(layers=(cell,) * num_layers, **kwargs)

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> tuple:
        params = []
        for cell, layer_key in zip(self.layers, jax.random.split(key, len(self.layers))):
            if self.bidirectional:
                key_f, key_b = jax.random.split(layer_key)
                layer = {"forward": cell.init(key_f, input_size, dtype), "backward": cell.init(key_b, input_size, dtype)}
                input_size = 2 * output_size(cell, layer["forward"], input_size, dtype)
            else:
                layer = cell.init(layer_key, input_size, dtype)
                input_size = output_size(cell, layer, input_size, dtype)
            params.append(layer)
        return tuple(params)

    def __call__(self, params, xs: jax.Array, *, carry=None, lengths=None, key=None, time_axis: int = 0, **scan_kwargs):
        """``xs [T, *batch, input_size]`` (time at ``time_axis``) -> ``(ys, final_carries)``.

        ``ys`` is the top layer's output, ``[T, *batch, H]`` or ``[T, *batch, 2H]`` when bidirectional. ``carry``,
        if given, is a tuple with one initial carry per layer. ``key`` switches dropout on. Other keyword arguments
        (``unroll``, ``remat``) go to `rnnlab.scan`.
        """
        from rnnlab.scan import scan

        if len(params) != len(self.layers):
            raise ValueError(f"params has {len(params)} layers; this Stack has {len(self.layers)}.")
        if carry is not None and len(carry) != len(self.layers):
            raise ValueError(f"carry has {len(carry)} entries; expected one per layer ({len(self.layers)}).")
        carries = carry if carry is not None else (None,) * len(self.layers)
        layer_keys = jax.random.split(key, len(self.layers)) if key is not None else (None,) * len(self.layers)
        final = []
        for depth, (cell, layer_params, layer_carry) in enumerate(zip(self.layers, params, carries)):
            run = dict(lengths=lengths, time_axis=time_axis, **scan_kwargs)
            if self.bidirectional:
                carry_f, carry_b = layer_carry if layer_carry is not None else (None, None)
                ys_f, out_f = scan(cell, layer_params["forward"], xs, carry=carry_f, **run)
                ys_b, out_b = scan(cell, layer_params["backward"], xs, carry=carry_b, reverse=True, **run)
                xs, layer_final = jnp.concatenate([ys_f, ys_b], axis=-1), (out_f, out_b)
            else:
                xs, layer_final = scan(cell, layer_params, xs, carry=layer_carry, **run)
            final.append(layer_final)
            if key is not None and self.dropout > 0.0 and depth < len(self.layers) - 1:
                keep = jax.random.bernoulli(layer_keys[depth], 1.0 - self.dropout, xs.shape)
                xs = jnp.where(keep, xs / (1.0 - self.dropout), jnp.zeros_like(xs))
        return xs, tuple(final)
