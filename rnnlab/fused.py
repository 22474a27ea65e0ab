r"""Fast whole-sequence recurrences for the built-in cells (`RNN`, `LSTM`, `GRU`), used by `rnnlab.scan`.

Plain autodiff of a `lax.scan` does, at every step of its backward loop, the weight-gradient matmul
``h_{t-1}^T @ δ_t`` besides the matmul that carries the cotangent back (``δ_t @ W_h^T``), and it saves whatever the
step's primitives happen to need. Here each built-in cell's recurrence over the whole sequence is one
`jax.custom_jvp` function whose tangent rule is written for speed:

- the forward loop saves little beyond the carries (the LSTM's gates; the GRU's gates and the n-block of
  ``h W_h + b_h``); the coefficients of the tangent (gate derivatives already multiplied by their partners, e.g.
  for the LSTM ``[g, c_{t-1}, i, \tanh c_t] ⊙ σ'``) are computed for all steps at once between the loops, so a
  backward step is one fused elementwise pass and one matmul;
- the tangent of the weights enters as ``H_{prev} @ \dot W_h``, one ``[T·batch, H] @ [H, G·H]`` matmul before the
  loop, so its transpose — what `jax.grad` runs — is the single matmul ``\bar W_h = H_{prev}^T \bar U`` after the
  backward loop. The input weights get the same treatment from `scan` hoisting ``cell.project_inputs``.

Reverse mode comes from JAX transposing the (linear) tangent rule, so the backward pass is a reverse `lax.scan` that
propagates only the carry cotangent and emits the per-step pre-activation cotangents. Unlike `jax.custom_vjp`, this
keeps forward mode (`jax.jvp`, `jax.jacfwd`, `jax.hessian`) working through `rnnlab.scan`.

With ``unroll=1`` the recurrence, its tangent and the tangent's transpose are `rnnlab.native`'s primitives (their
masked twins with a padding mask): on CPU in float32 they run as C++ kernels that split each step's matmul and gate
maths over the cores (XLA runs the per-step matmul of a loop on one core); elsewhere they lower to the same maths
written here (on a GPU with 8 steps per loop iteration).

`linearised_steps` hands the same kernels to `rnnlab.gradflow`: a forward loop that saves the gates and a transposed
step built from them, so the log-domain backward pass needs one matmul per step and recomputes nothing.

The numbers equal plain autodiff of the cell's step to floating-point rounding (tests: ``tests/test_fused.py``).
Subclasses of the built-in cells and cells with a callable activation take the plain path, since they may change
the step.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from rnnlab import native
from rnnlab.cells import _ACTIVATIONS, GRU, LSTM, RNN

#: The cell types with a fused recurrence; exact types only, since a subclass may override the step.
SUPPORTED = (RNN, LSTM, GRU)

#: Derivative of each named RNN activation written through its output ``h = φ(z)`` (``None``: identity, φ' = 1).
_RNN_DERIVATIVES: dict[str, Callable[[jax.Array], jax.Array] | None] = {
    "tanh": lambda h: 1.0 - h * h,
    # jax.nn.relu's derivative at 0 is 0, and h > 0 exactly when z > 0.
    "relu": lambda h: (h > 0).astype(h.dtype),
    "linear": None,
}


class _Kernel(NamedTuple):
    """One cell's recurrence, split the way the fused rule needs it; arrays are ``[N, ...]`` per step, ``[T, N, ...]``
    for all steps.

    - ``step(params, carry, px_t) -> (carry, saved_t)``: the cell's step, also returning what the coefficients need
      beyond the carries (the loop stays short: everything that can be is computed for all steps at once).
    - ``coefficients(params, saved, carries, previous) -> coeffs``: the per-step coefficients of the tangent,
      for all steps at once (``carries``: the carry after each step; ``previous``: the carry before it).
    - ``tangent_inputs(params, d_params, dpx, h_prev, coeffs) -> u``: the part of each tangent step that does not
      depend on the carry's tangent, for all steps at once; the weights' tangents enter only here.
    - ``tangent_step(params, d_carry, u_t, coeffs_t) -> d_carry``: the linear recurrence of the carry's tangent.
    """

    step: Callable
    coefficients: Callable
    tangent_inputs: Callable
    tangent_step: Callable


def _hidden_of(carry):
    return carry[0] if isinstance(carry, tuple) else carry


def over_steps(fn: Callable[[jax.Array], jax.Array], xs: jax.Array) -> jax.Array:
    """``fn`` (a product on the last axis) of ``xs [T, *batch, K]``, for every step at once.

    In a process with one device ``xs`` is flattened to ``[T·batch, K]``: XLA's CPU backend runs the transpose of the
    unflattened product (the weight's gradient, a contraction over the time and batch axes) up to 3x slower (16.9
    against 5.1 ms for W_x at T 1000, batch 16, input 32, hidden 128). With several devices the product stays
    unflattened: merging time with a batch split over devices would gather the batch on every device.
    """
    if xs.ndim <= 2 or jax.device_count() > 1:
        return fn(xs)
    flat = fn(xs.reshape(-1, xs.shape[-1]))
    return flat.reshape(xs.shape[:-1] + flat.shape[-1:])


def _weight_tangent(h_prev: jax.Array, d_w: jax.Array) -> jax.Array:
    """``h_prev [T, N, H] @ d_w [H, G·H]`` for all steps at once; its transpose is the weight gradient."""
    return over_steps(lambda h: h @ d_w, h_prev)


def _recurrent_tangent_inputs(params, d_params, dpx, h_prev, coeffs):
    return dpx + _weight_tangent(h_prev, d_params["w_h"])


# --- Elman RNN: h' = φ(px + h W_h) ---------------------------------------------------------------------------------


def _rnn_kernel(activation: str) -> _Kernel:
    phi, derivative = _ACTIVATIONS[activation], _RNN_DERIVATIVES[activation]

    def step(params, h, px_t):
        return phi(px_t + h @ params["w_h"]), ()

    def coefficients(params, saved, hs, previous):
        return () if derivative is None else derivative(hs)

    def tangent_step(params, dh, u_t, derivative_t):
        dz = u_t + dh @ params["w_h"]
        return dz if derivative is None else dz * derivative_t

    return _Kernel(step, coefficients, _recurrent_tangent_inputs, tangent_step)


# --- LSTM -----------------------------------------------------------------------------------------------------------


def _lstm_step(params, carry, px_t):
    h, c = carry
    z_i, z_f, z_g, z_o = jnp.split(px_t + h @ params["w_h"], 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(z_i), jax.nn.sigmoid(z_f), jnp.tanh(z_g), jax.nn.sigmoid(z_o)
    c_new = f * c + i * g
    return (o * jnp.tanh(c_new), c_new), jnp.concatenate([i, f, g, o], axis=-1)


def _lstm_coefficients(params, gates, carries, previous):
    (_, cs), (_, c_prev) = carries, previous
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    tanh_c = jnp.tanh(cs)
    # ċ' = f ċ + c·ḟ + g·i̇ + i·ġ and ḣ' = o(1 - tanh²c')·ċ' + tanh c'·ȯ, with ẋ = x(1 - x)·ż for the sigmoid gates
    # and (1 - g²)·ż for the cell gate: each gate's partner times its derivative, in the layout of z.
    partner_times_derivative = jnp.concatenate(
        [g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)], axis=-1
    )
    return partner_times_derivative, o * (1 - tanh_c * tanh_c), f


def _lstm_tangent_step(params, d_carry, u_t, coeffs_t):
    dh, dc = d_carry
    partner_times_derivative, dh_dc, f = coeffs_t
    batch, hidden = dh.shape
    terms = ((u_t + dh @ params["w_h"]) * partner_times_derivative).reshape(batch, 4, hidden)
    # Sums against gate masks rather than slices: their transposes are broadcasts, which fuse into the one
    # elementwise pass of the backward step (a slice's transpose is a concatenate, which does not).
    into_cell = jnp.asarray([1, 1, 1, 0], dh.dtype)[:, None]
    dc_new = f * dc + jnp.sum(terms * into_cell, axis=1)
    return dh_dc * dc_new + jnp.sum(terms * (1 - into_cell), axis=1), dc_new


_LSTM = _Kernel(_lstm_step, _lstm_coefficients, _recurrent_tangent_inputs, _lstm_tangent_step)


# --- GRU (cuDNN / PyTorch convention) -------------------------------------------------------------------------------


def _gru_step(params, h, px_t):
    x_r, x_z, x_n = jnp.split(px_t, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(h @ params["w_h"] + params["b_h"], 3, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    # The gates and h_n = (h W_h + b_h)_n are what the tangent's coefficients need: saved, none is recomputed.
    return (1.0 - z) * n + z * h, jnp.concatenate([r, z, n, h_n], axis=-1)


def _gru_coefficients(params, saved, hs, h_prev):
    r, z, n, h_n = jnp.split(saved, 4, axis=-1)
    # With P = (ẋ_r + ȧ_r, ẋ_z + ȧ_z, ẋ_n + r ȧ_n) (a = h W_h + b_h):
    # ḣ' = (1 - z)(1 - n²)·(P_n + r(1 - r) a_n · P_r) + (h - n) z(1 - z) · P_z + z ḣ,
    # i.e. ḣ' = Σ_blocks(into_h ⊙ u + into_h ⊙ [1, 1, r] ⊙ ȧ) + z ḣ with these per-block coefficients:
    new_coeff = (1 - z) * (1 - n * n)
    into_h = jnp.concatenate([new_coeff * r * (1 - r) * h_n, (h_prev - n) * z * (1 - z), new_coeff], axis=-1)
    return r, into_h, _through_reset(r, into_h), z


def _through_reset(r: jax.Array, da: jax.Array) -> jax.Array:
    """The tangent of ``a = h W_h + b_h`` as it enters the GRU's gates: its n-block through the reset gate. (A
    product with ``[1, 1, r]``, not a concatenation of ``da``'s blocks: in `jax.sharding`'s explicit mode ``r`` may
    be split over devices where ``da`` is not, and blocks to concatenate must be split alike.)"""
    ones = jnp.ones_like(r)
    return da * jnp.concatenate([ones, ones, r], axis=-1)


def _gru_tangent_inputs(params, d_params, dpx, h_prev, coeffs):
    return dpx + _through_reset(coeffs[0], _weight_tangent(h_prev, d_params["w_h"]) + d_params["b_h"])


def _gru_tangent_step(params, dh, u_t, coeffs_t):
    _, into_h, recurrent_into_h, z = coeffs_t
    batch, hidden = dh.shape
    # A sum over the gate blocks rather than slices: its transpose is a broadcast, which fuses into the backward
    # step's elementwise pass (a slice's transpose is a concatenate, which does not).
    terms = u_t * into_h + (dh @ params["w_h"]) * recurrent_into_h
    return jnp.sum(terms.reshape(batch, 3, hidden), axis=1) + z * dh


_GRU = _Kernel(_gru_step, _gru_coefficients, _gru_tangent_inputs, _gru_tangent_step)
_RNN = {activation: _rnn_kernel(activation) for activation in _RNN_DERIVATIVES}


# --- the generic driver ---------------------------------------------------------------------------------------------


def _kernel(cell) -> _Kernel:
    if type(cell) is LSTM:
        return _LSTM
    if type(cell) is GRU:
        return _GRU
    return _RNN[cell.activation]


def _masked(valid_t, new, old):
    """``new`` where the step is valid, else ``old``, leaf by leaf (``valid_t [N]``)."""
    if valid_t is None:
        return new
    return jax.tree_util.tree_map(lambda a, b: jnp.where(valid_t[:, None], a, b), new, old)


def _previous(hs: jax.Array, h0: jax.Array, reverse: bool) -> jax.Array:
    """The hidden state entering each step, ``[T, N, H]``, in the time order of ``hs``."""
    if reverse:
        return jnp.concatenate([hs[1:], h0[None]], axis=0)
    return jnp.concatenate([h0[None], hs[:-1]], axis=0)


def _outputs(hs: jax.Array, valid) -> jax.Array:
    # A padded step keeps its carry and outputs exactly zero, as in the plain path.
    return hs if valid is None else jnp.where(valid[..., None], hs, jnp.zeros_like(hs))


def _emit_both(carry, extra):
    return carry, extra


def _emit_hidden(carry, extra):
    return _hidden_of(carry)


def _masked_scan(step, carry, xs, valid, reverse: bool, unroll: int, emit=_emit_both):
    """`jax.lax.scan` of ``step(carry, x_t) -> (new_carry, extra_t)`` over ``xs``, emitting ``emit(carry_t,
    extra_t)`` per step (by default both); with ``valid [T, N]`` a step where ``valid[t, n]`` is false keeps row n's
    carry (the rule of the masked recurrences, here and in `rnnlab.native`'s kernels)."""

    def body(carry, inputs):
        x_t, valid_t = (inputs, None) if valid is None else inputs
        new_carry, extra = step(carry, x_t)
        new_carry = _masked(valid_t, new_carry, carry)
        return new_carry, emit(new_carry, extra)

    return jax.lax.scan(body, carry, xs if valid is None else (xs, valid), reverse=reverse, unroll=unroll)


def _native(unroll: int, px) -> bool:
    """Whether this recurrence runs on `rnnlab.native`'s primitives (masked ones with a padding mask): any built-in
    cell, ``unroll=1``, at least one step. They lower to the C++ kernels on CPU in float32 and to the same maths in
    XLA elsewhere."""
    return unroll == 1 and px.shape[0] > 0 and native.enabled()


def _native_recurrence(kernel: _Kernel, reverse: bool, params, carry, px, valid, d_params=None, d_carry=None,
                       dpx=None, inputs=None):
    """The recurrence on `rnnlab.native`'s primitives: ``(hs, final_carry)``, and with tangents also ``(d_hs,
    d_final_carry)``. The weights' tangent ``Ẇ_h`` goes to the tangent primitive itself, whose transpose forms W_h's
    gradient inside the backward loop. With ``valid`` the masked primitives run: their ``hs`` are the carries, kept
    through invalid steps, so the final carry is still the last step's and only the outputs are zeroed here. The
    LSTM and the GRU may take ``inputs = (w_x, b, xs)`` in place of ``px = xs @ w_x + b`` (the GRU's b_x as
    ``b``): their forward kernels then project each step's input themselves (`native.lstm_forward_inputs_p`,
    `native.gru_forward_inputs_p`, or their masked twins, which project the valid rows alone); the LSTM's without
    tangents runs its forward pass alone (`native.lstm_infer_p`).

    A hidden size that is not a multiple of `native.LANES` runs padded with units that stay zero
    (`native.padded_hidden`): padded here once, so that what the primitives keep for the backward pass stays
    padded, and the results cut back."""
    hidden = params["w_h"].shape[0]
    size = native.padded_hidden(hidden, (px if inputs is None else inputs[2]).dtype)
    if size != hidden:
        def grow(tree, dims):
            return jax.tree_util.tree_map(lambda x: native.resize_hidden(x, dims, hidden, size), tree)

        def weights(tree):  # w_h [H, G·H] and the GRU's b_h [G·H] (None: no tangents)
            return None if tree is None else {name: grow(value, "k g" if name == "w_h" else "g")
                                              for name, value in tree.items()}

        grown = None if inputs is None else (grow(inputs[0], "i g"), grow(inputs[1], "g"), inputs[2])
        padded = _native_recurrence(kernel, reverse, weights(params), grow(carry, "b h"), grow(px, "t b g"), valid,
                                    weights(d_params), grow(d_carry, "b h"), grow(dpx, "t b g"), grown)
        return jax.tree_util.tree_map(lambda x: x[..., :hidden], padded)
    last, options = (0 if reverse else -1), {"reverse": reverse, "threads": native.threads()}
    mask = () if valid is None else (valid,)

    def primitive(name):
        return getattr(native, f"{name}{'' if valid is None else '_masked'}_p")

    w_h = params["w_h"]
    if kernel == _LSTM:
        h0, c0 = carry
        if inputs is None:
            hs, cs, gates = native.bind(primitive("lstm_forward"), w_h, h0, c0, px, *mask, **options)
        elif d_params is None:  # nothing differentiates it: the forward pass alone, nothing kept for a backward pass
            hs, c = native.bind(primitive("lstm_infer"), w_h, *inputs[:2], h0, c0, inputs[2], *mask, **options)
            return _outputs(hs, valid), (hs[last], c)
        else:
            hs, cs, gates = native.bind(primitive("lstm_forward_inputs"), w_h, *inputs[:2], h0, c0, inputs[2], *mask,
                                        **options)
        primal = _outputs(hs, valid), (hs[last], cs[last])
        if d_params is None:
            return primal
        d_hs, d_h, d_c = native.bind(primitive("lstm_tangent"), w_h, gates, cs, c0, hs, h0, *mask, dpx,
                                     d_params["w_h"], *d_carry, **options)
        return primal, (_outputs(d_hs, valid), (d_h, d_c))
    h0 = carry
    if kernel == _GRU:
        if inputs is None:
            hs, gates, a_n = native.bind(primitive("gru_forward"), w_h, params["b_h"], h0, px, *mask, **options)
        else:
            hs, gates, a_n = native.bind(primitive("gru_forward_inputs"), w_h, params["b_h"], *inputs[:2], h0,
                                         inputs[2], *mask, **options)
        if d_params is None:
            return _outputs(hs, valid), hs[last]
        # b_h's tangent as one more row of W_h's (a = [h, 1] [W_h; b_h]): the backward kernel sums its gradient with
        # W_h's, so r, which it takes through the reset gate, is not sliced out of the gates for XLA to do so.
        d_weights = jnp.concatenate([d_params["w_h"], d_params["b_h"][None]])
        d_hs, d_h = native.bind(primitive("gru_tangent"), w_h, gates, a_n, hs, h0, *mask, dpx, d_weights, d_carry,
                                **options)
        return (_outputs(hs, valid), hs[last]), (_outputs(d_hs, valid), d_h)
    activation = next(name for name, rnn in _RNN.items() if rnn == kernel)
    (hs,) = native.bind(primitive("rnn_forward"), w_h, h0, px, *mask, activation=activation, **options)
    if d_params is None:
        return _outputs(hs, valid), hs[last]
    d_hs, d_h = native.bind(primitive("rnn_tangent"), w_h, hs, h0, *mask, dpx, d_params["w_h"], d_carry,
                            activation=activation, **options)
    return (_outputs(hs, valid), hs[last]), (_outputs(d_hs, valid), d_h)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _recurrence(kernel: _Kernel, reverse: bool, unroll: int, params, carry, px, valid):
    if _native(unroll, px):
        return _native_recurrence(kernel, reverse, params, carry, px, valid)
    step = functools.partial(kernel.step, params)
    carry, hs = _masked_scan(step, carry, px, valid, reverse, unroll, _emit_hidden)
    return _outputs(hs, valid), carry


@_recurrence.defjvp
def _recurrence_jvp(kernel, reverse, unroll, primals, tangents):
    params, carry0, px, valid = primals
    d_params, d_carry0, dpx, _ = tangents
    if _native(unroll, px):
        return _native_recurrence(kernel, reverse, params, carry0, px, valid, d_params, d_carry0, dpx)
    step = functools.partial(kernel.step, params)
    carry, (carries, saved) = _masked_scan(step, carry0, px, valid, reverse, unroll)
    previous = jax.tree_util.tree_map(lambda seq, first: _previous(seq, first, reverse), carries, carry0)
    coeffs = kernel.coefficients(params, saved, carries, previous)
    u = kernel.tangent_inputs(params, d_params, dpx, _hidden_of(previous), coeffs)

    def tangent_step(d_carry, inputs):
        return kernel.tangent_step(params, d_carry, *inputs), ()

    d_carry, d_hs = _masked_scan(tangent_step, d_carry0, (u, coeffs), valid, reverse, unroll, _emit_hidden)
    return (_outputs(_hidden_of(carries), valid), carry), (_outputs(d_hs, valid), d_carry)


def supports(cell, params, carry, inputs: jax.Array) -> bool:
    """Whether `recurrence` and `linearised_steps` run ``cell``: an exact built-in type, a named activation, and one
    float dtype throughout, ``inputs`` (raw or projected) included (the plain path handles mixed dtypes by
    promotion)."""
    if type(cell) not in SUPPORTED:
        return False
    if type(cell) is RNN and not (isinstance(cell.activation, str) and cell.activation in _RNN_DERIVATIVES):
        return False
    leaves = jax.tree_util.tree_leaves((params, carry))
    return all(jnp.result_type(leaf) == inputs.dtype for leaf in leaves)


def recurrence(cell, params, carry, projected: jax.Array, *, valid: jax.Array | None = None, reverse: bool = False,
               unroll: int = 1) -> tuple[Any, jax.Array]:
    """Run ``cell.recur`` over time on inputs already projected by ``cell.project_inputs``.

    **Arguments:** ``projected [T, *batch, G·H]``; ``carry`` as from ``cell.initial_carry(batch)``; ``valid [T,
    *batch]`` booleans (None: every step valid): at an invalid step the carry is kept and the output is zero;
    ``reverse``: run from the last step to the first.

    **Returns:** ``(final_carry, hs)`` with ``hs [T, *batch, H]``, as `jax.lax.scan` of the masked step would.
    """
    params = _recurrent_weights(params)
    return _with_flat_batch(lambda flat_carry, flat_px, flat_valid: _recurrence(
        _kernel(cell), reverse, unroll, params, flat_carry, flat_px, flat_valid), carry, projected, valid)


def _with_flat_batch(run, carry, sequence: jax.Array, valid: jax.Array | None = None):
    """``(final_carry, hs)`` from ``run(carry, sequence, valid) -> (hs, final_carry)`` on the batch axes flattened
    to one, ``[N, ...]`` and ``[T, N, ...]`` as the kernels take them (``sequence [T, *batch, K]``, ``valid [T,
    *batch]``), and the results' batch axes restored."""
    seq_len, batch_shape = sequence.shape[0], sequence.shape[1:-1]
    batch = math.prod(batch_shape)
    flat_carry = jax.tree_util.tree_map(lambda a: a.reshape((batch,) + a.shape[len(batch_shape):]), carry)
    flat_valid = None if valid is None else valid.reshape(seq_len, batch)
    hs, final = run(flat_carry, sequence.reshape(seq_len, batch, sequence.shape[-1]), flat_valid)
    final = jax.tree_util.tree_map(lambda a: a.reshape(batch_shape + a.shape[1:]), final)
    return final, hs.reshape((seq_len,) + batch_shape + hs.shape[-1:])


def recurrence_of_inputs(cell, params, carry, xs: jax.Array, *, valid: jax.Array | None = None,
                         reverse: bool = False, unroll: int = 1):
    """`recurrence` on ``cell.project_inputs(params, xs)`` (``xs [T, *batch, input_size]``; ``valid`` as there), as
    `rnnlab.scan` runs a built-in cell (with ``remat``, chunk by chunk). On `rnnlab.native`'s kernels the LSTM's
    and the GRU's forward kernels project each step's input in their loop, so that no projection of every step is
    written to memory and read back; masked, the valid rows' alone (padded sequences at batch 64, T = 200, lengths
    100-200, input 128, hidden 256: the LSTM's gradient from 185-196 to 154-168 ms, the GRU's from 150-168 to
    140-143 ms, `benchmarks/bench_padded.py`'s call in alternating processes, 2026-11-27). An `LSTM` evaluated
    without differentiation (its forward pass alone, as in evaluation and inference) runs
    `rnnlab.native.lstm_infer_p`, which keeps nothing for a backward pass either (batch 16, T = 1000, input 32,
    hidden 128: 15.7 against 43.2 ms, `benchmarks/bench_forward.py`); differentiated, it is `recurrence`'s rule with
    `rnnlab.native.lstm_forward_inputs_p` (the tangent's projection, linear, stays one XLA matmul over all steps).
    The GRU runs `rnnlab.native.gru_forward_inputs_p` either way. Their outputs differ by rounding from those of
    the inputs projected for all steps."""
    if type(cell) not in (LSTM, GRU) or not _native(unroll, xs):
        projected = over_steps(lambda x: cell.project_inputs(params, x), xs)
        return recurrence(cell, params, carry, projected, valid=valid, reverse=reverse, unroll=unroll)
    # The input's weights under one name for both cells: w_x and its bias b (the GRU's b_x), besides w_h (and b_h).
    weights = {"w_x": params["w_x"], "b": params[cell.bias_names[0]], **_recurrent_weights(params)}
    return _with_flat_batch(lambda flat_carry, flat_xs, flat_valid: _recurrence_of_inputs(
        _kernel(cell), reverse, unroll, weights, flat_carry, flat_xs, flat_valid), carry, xs, valid)


def _recurrent_weights(params):
    """What the recurrence itself takes of a cell's parameters: W_h (and the GRU's b_h)."""
    return {name: params[name] for name in ("w_h", "b_h") if name in params}


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _recurrence_of_inputs(kernel: _Kernel, reverse: bool, unroll: int, weights, carry, xs, valid):
    return _native_recurrence(kernel, reverse, _recurrent_weights(weights), carry, None, valid,
                              inputs=(weights["w_x"], weights["b"], xs))


@_recurrence_of_inputs.defjvp
def _recurrence_of_inputs_jvp(kernel, reverse, unroll, primals, tangents):
    # The forward kernel projects each step's input itself; the tangent of the projection, linear, is XLA's (its
    # transpose gives W_x's and b's gradients as one matmul over all steps, as when `scan` hoists the projection).
    (weights, carry, xs, valid), (d_weights, d_carry, dxs, _) = primals, tangents
    dpx = (over_steps(lambda x: x @ d_weights["w_x"], xs) + over_steps(lambda d: d @ weights["w_x"], dxs)
           + d_weights["b"])
    return _native_recurrence(kernel, reverse, _recurrent_weights(weights), carry, None, valid,
                              _recurrent_weights(d_weights), d_carry, dpx, (weights["w_x"], weights["b"], xs))


def linearised_steps(cell, params, carry, xs: jax.Array, *, unroll: int = 1):
    """The recurrence over ``xs [T, N, input_size]`` from ``carry`` (batch flattened to ``N``; ``unroll`` steps per
    loop iteration), with what a backward pass over the carry alone needs: ``(final_carry, before, per_step,
    transpose)``.

    ``before``: the carry before each step, ``[T, N, ...]`` per leaf. ``transpose(cotangent, after, per_step[t])``
    applies the transposed Jacobian of step ``t`` (``after``: the carry after the step) and returns the cotangent of
    the carry before it and that carry: one matmul and one elementwise pass that also forms the step's
    coefficients from what the forward loop saved, so no matmul is recomputed (`rnnlab.gradflow` runs its log-domain
    backward pass on it).
    """
    kernel = _kernel(cell)
    recurrent_params = {name: params[name] for name in ("w_h", "b_h") if name in params}

    def body(carry, x_t):
        # Each step projects its own input: hoisted out of the loop, the [T, N, G·H] projection of vmapped
        # configurations is transposed to time-major and copied, passes over memory that cost more than this small
        # matmul.
        px_t = cell.project_inputs(params, x_t)
        new_carry, saved_t = kernel.step(recurrent_params, carry, px_t)
        return new_carry, (saved_t, carry)

    final, (saved, before) = jax.lax.scan(body, carry, xs, unroll=unroll)
    no_input = jnp.zeros(jax.eval_shape(cell.project_inputs, params, xs[0]).shape, xs.dtype)

    def transpose(cotangent, after, per_step_t):
        # Formed inside the backward loop, the coefficients stay in cache; formed for all steps at once they would
        # be several passes over [T, N, G·H] arrays in memory. The carry after a step is the one before the next,
        # so the backward loop hands it on instead of the forward loop storing every carry twice.
        saved_t, before_t = per_step_t
        coeffs_t = kernel.coefficients(recurrent_params, saved_t, after, before_t)

        def tangent_step(d_carry):
            return kernel.tangent_step(recurrent_params, d_carry, no_input, coeffs_t)

        return jax.linear_transpose(tangent_step, cotangent)(cotangent)[0], before_t

    return final, before, (saved, before), transpose
