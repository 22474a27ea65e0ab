"""The recurrences of the plain RNN, and of the LSTM and GRU at small hidden sizes, on a GPU as one Pallas (Triton)
program per 16 batch rows.

On a GPU, XLA runs a `lax.scan` as a loop whose every iteration launches its kernels and waits for the loop
condition: about 4 µs a step for the tanh RNN at batch 16, hidden 128 on an H200, whatever the step's work (see
benchmarks/README.md, "On a GPU"). Here one program runs all ``T`` steps of its 16 rows, with ``W_h`` loaded once
and held in registers (at most `HELD_FLOATS` float32, 64 KB: the plain RNN to hidden 128, the LSTM and GRU to
hidden 64), so a step costs the loads of its inputs, one small matmul per gate, the gate maths and the stores
(the loads issued a step ahead, `read_ahead`).

Each forward kernel computes what its primitive in `rnnlab.native` does (``hs``, and the LSTM's ``cs`` and gates,
the GRU's gates and ``a_n``); each backward kernel is the transpose of the primitive's tangent, run from the last
step to the first with ``λ`` the cotangent of the carry: for the plain RNN, ``g_z_t = (g_hs_t + λ) ⊙ φ'(h_t)`` and
``λ ← g_z_t W_hᵀ``, returning ``g_z [T, B, H]`` (the cotangent of ``px``) and ``λ`` at the first step (``h0``'s);
the LSTM's and GRU's likewise per gate block, with the cell state's cotangent carried beside ``λ`` for the LSTM.
``W_h``'s gradient, ``Σ_t h_{t-1}ᵀ g_z_t``, is one XLA matmul after the kernel. ``reverse`` runs the recurrence
from ``t = T - 1`` down, as `lax.scan` does. With ``valid [T, B]`` (padded sequences: the primitives' masked
twins) a row at an invalid step keeps its carry, its pre-activation cotangent is zero and the carry's cotangent
(its output's added) passes to the step before unchanged.

Triton slices no loaded value, so the gate blocks are loaded and stored one by one (``W_h``'s blocks too), each
gate has its own matmul, and the gate maths is written here block by block rather than taken from `rnnlab.fused`'s
steps, which split and concatenate whole rows; the tests hold the kernels to those steps' float64 results.

The LSTM and GRU at hidden 128 are not here: their ``W_h`` (256 and 192 KB) does not fit in one program's
registers. Read from the L2 cache every step, one program per 16 rows ran the LSTM 2x slower than XLA's loop; four
programs each holding one gate's block and meeting at a barrier every step were 10 % faster than it, forward only
(probes of 2026-11-26 on an H200, benchmarks/README.md).

The kernels' matmuls follow `jax.default_matmul_precision` as XLA's do (`jnp.dot` reads it while tracing): TF32
allowed on a GPU by default, float32 under ``"highest"``.

Pallas's Triton backend is deprecated from jax 0.11 (a DeprecationWarning at each lowering, silenced here: a user
cannot act on it). Where a JAX has none, `applies` is False and the XLA loops run; porting these kernels to
Mosaic GPU is what keeps them.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

#: Rows of the batch per program: the smallest matmul a Triton dot takes.
ROWS = 16
#: Hidden sizes the kernels take (powers of two: Triton's blocks are).
HIDDEN_SIZES = (16, 32, 64, 128)
#: Floats of ``W_h [H, G·H]`` one program holds in registers: the plain RNN's at hidden 128 (64 KB), which held
#: was 1.4x faster than read from L2 every step in the H200 probe.
HELD_FLOATS = 128 * 128
#: Warps per program: with each step's inputs read ahead, 4 took 3-10 % less time than 8 in each of five cases on an
#: H100 (LSTM and GRU at hidden 64, the plain RNN at 64 and 128; 16 warps 11-30 % more; benchmarks/README.md, "Run
#: 7"). Without reading ahead, 8 had taken 7-19 % less than 4 in the H200 probe of the plain RNN.
NUM_WARPS = 4
#: Gate blocks of ``W_h`` per cell: the plain RNN (named by its activation), the GRU and the LSTM.
GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def applies(w_h_shape, sequence_shape, dtypes, activation: str | None = None) -> bool:
    """Whether the kernels run this recurrence: ``W_h [H, G·H]`` (one set of weights; ``G`` 1 for the plain RNN,
    whose built-in ``activation`` is given, 3 for the GRU and 4 for the LSTM, ``activation=None``) with ``H`` in
    `HIDDEN_SIZES` and at most `HELD_FLOATS` elements, a sequence ``[T, B, ...]`` with rows (``B > 0``) whose widest
    array ``[T, B, G·H]`` has fewer than 2³¹ elements once padded (Triton's offsets are 32-bit), float32 throughout,
    and a Pallas that lowers to Triton."""
    from rnnlab.fused import _RNN_DERIVATIVES

    if len(w_h_shape) != 2 or w_h_shape[0] not in HIDDEN_SIZES:
        return False
    (hidden, width), (steps, batch) = w_h_shape, sequence_shape[:2]
    gates = GATES["rnn"] if activation is not None else width // hidden
    return (width == gates * hidden and gates in GATES.values() and hidden * width <= HELD_FLOATS
            and (activation in _RNN_DERIVATIVES if gates == 1 else activation is None)
            and 0 < steps * _padded_rows(batch) * width < 2**31 and all(dtype == jnp.float32 for dtype in dtypes)
            and _compiler_params() is not None)


@functools.cache
def _compiler_params():
    try:
        from jax.experimental.pallas import triton as pallas_triton
    except ImportError:
        return None
    params = getattr(pallas_triton, "CompilerParams", None) or getattr(pallas_triton, "TritonCompilerParams", None)
    return None if params is None else params(num_warps=NUM_WARPS, num_stages=1)


def read_ahead() -> bool:
    """Whether the kernels read each step's inputs one step ahead (issued before the step's matmuls, used after
    them, so the loads' latency overlaps the step's work): unless ``$RNNLAB_PALLAS_AHEAD`` is ``0``; read while
    tracing. On an H100 (benchmarks/README.md, "Run 7") reading ahead was faster in each of the 11 cases timed
    beside the kernels without it: 1.08-1.10x for the plain RNN at hidden 128, 1.05-1.45x at hidden 64 (LSTM
    1.19-1.30x, GRU 1.09-1.45x, tanh RNN 1.05-1.30x, padded sequences included)."""
    return os.environ.get("RNNLAB_PALLAS_AHEAD", "1") != "0"


def _time(step, steps: int, reverse: bool):
    """The time index of loop iteration ``step``."""
    return steps - 1 - step if reverse else step


def _read_time(step, steps: int, reverse: bool):
    """The time index whose inputs loop iteration ``step`` reads, clamped: reading ahead, the read one past the last
    step is never used."""
    return _time(jnp.minimum(step, steps - 1), steps, reverse)


def _mask_at(valid_ref: list, t) -> tuple:
    """``(valid[t] [ROWS],)`` with a padding mask, else ``()``."""
    return tuple(valid[t, :] for valid in valid_ref)


def _loop(steps: int, read, advance, state, ahead: bool):
    """``state`` after ``advance(s, state, *read(s))`` for ``s`` in ``0..steps-1``; ``ahead``: each step's
    ``read(s + 1)`` issued before its ``advance`` (``read`` clamps ``s``: the read past the last step is unused)."""
    if not ahead:
        return jax.lax.fori_loop(0, steps, lambda s, state: advance(s, state, *read(s)), state)

    def step(s, carry):
        state, inputs = carry
        upcoming = read(s + 1)
        return advance(s, state, *inputs), upcoming

    return jax.lax.fori_loop(0, steps, step, (state, read(0)))[0]


def _blocks(ref, index: tuple, gates: int, hidden: int) -> list:
    """``ref[index]``'s last axis as ``gates`` blocks of ``hidden``, each loaded on its own."""
    from jax.experimental import pallas as pl

    return [ref[(*index, pl.ds(k * hidden, hidden))] for k in range(gates)]


def _store_blocks(ref, t, blocks: list):
    """``ref[t]``'s last axis from ``blocks``, each stored on its own."""
    from jax.experimental import pallas as pl

    hidden = blocks[0].shape[-1]
    for k, block in enumerate(blocks):
        ref[t, :, pl.ds(k * hidden, hidden)] = block


def _times_w(h, w_blocks: list) -> list:
    """``h W_h``, block by block."""
    return [jnp.dot(h, w, preferred_element_type=jnp.float32) for w in w_blocks]


def _times_w_transposed(g_blocks: list, w_blocks: list):
    """``g W_hᵀ`` from ``g``'s blocks: each block's hidden axis contracted with its ``W_h`` block's output axis."""
    terms = [jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
             for g, w in zip(g_blocks, w_blocks)]
    return functools.reduce(jnp.add, terms)


def _keep(valid_t):
    """The rows of a step that run it, ``[ROWS, 1]``, or None without a mask."""
    return valid_t[0][:, None] > 0 if valid_t else None


def _kept(keep, new, old):
    return new if keep is None else jnp.where(keep, new, old)


def _state_before(s, steps: int, back: bool, ref, first):
    """In a loop running backward through time, the state entering iteration ``s``'s step: ``ref`` at the time of
    iteration ``s + 1``, or ``first`` (``h0``, ``c0``) at the last iteration."""
    return jnp.where(s >= steps - 1, first, ref[_read_time(s + 1, steps, back), :, :])


# --- the plain RNN: h_t = φ(px_t + h_{t-1} W_h) --------------------------------------------------------------------


def _rnn_forward_kernel(w_ref, h0_ref, px_ref, *refs, steps, reverse, activation, ahead):
    from rnnlab.cells import _ACTIVATIONS

    *valid_ref, hs_ref = refs  # with a padding mask, ``valid [T, B]`` (1.0 or 0.0) before the output
    phi = _ACTIVATIONS[activation]
    w_h = w_ref[...]  # loaded once: held in registers for all steps

    def read(s):
        t = _read_time(s, steps, reverse)
        return (px_ref[t, :, :], *_mask_at(valid_ref, t))

    def advance(s, h, px_t, *valid_t):
        new = _kept(_keep(valid_t), phi(px_t + _times_w(h, [w_h])[0]), h)
        hs_ref[_time(s, steps, reverse), :, :] = new
        return new

    _loop(steps, read, advance, h0_ref[...], ahead)


def _rnn_backward_kernel(w_ref, hs_ref, g_hs_ref, g_h_ref, *refs, steps, reverse, activation, ahead):
    from rnnlab.fused import _RNN_DERIVATIVES

    *valid_ref, g_z_ref, g_h0_ref = refs
    derivative = _RNN_DERIVATIVES[activation]
    w_h = w_ref[...]
    back = not reverse  # the recurrence ran forward in time for `reverse=False`: its transpose runs the other way

    def read(s):
        t = _read_time(s, steps, back)
        return (hs_ref[t, :, :], g_hs_ref[t, :, :], *_mask_at(valid_ref, t))

    def advance(s, g_carry, h_t, g_h_t, *valid_t):
        keep = _keep(valid_t)
        g = g_h_t + g_carry
        g_z = _kept(keep, g if derivative is None else g * derivative(h_t), 0.0)
        g_z_ref[_time(s, steps, back), :, :] = g_z
        return _kept(keep, _times_w_transposed([g_z], [w_h]), g)

    g_h0_ref[...] = _loop(steps, read, advance, g_h_ref[...], ahead)


# --- the LSTM (gates i, f, g, o) ------------------------------------------------------------------------------------


def _lstm_forward_kernel(w_ref, h0_ref, c0_ref, px_ref, *refs, steps, reverse, ahead):
    *valid_ref, hs_ref, cs_ref, gates_ref = refs
    hidden = h0_ref.shape[-1]
    w_h = _blocks(w_ref, (slice(None),), 4, hidden)

    def read(s):
        t = _read_time(s, steps, reverse)
        return (*_blocks(px_ref, (t, slice(None)), 4, hidden), *_mask_at(valid_ref, t))

    def advance(s, carry, px_i, px_f, px_g, px_o, *valid_t):
        h, c = carry
        z_i, z_f, z_g, z_o = (px + hw for px, hw in zip((px_i, px_f, px_g, px_o), _times_w(h, w_h)))
        i, f, g, o = jax.nn.sigmoid(z_i), jax.nn.sigmoid(z_f), jnp.tanh(z_g), jax.nn.sigmoid(z_o)
        keep = _keep(valid_t)
        c_new = _kept(keep, f * c + i * g, c)
        h_new = _kept(keep, o * jnp.tanh(c_new), h)
        t = _time(s, steps, reverse)
        hs_ref[t, :, :] = h_new
        cs_ref[t, :, :] = c_new
        _store_blocks(gates_ref, t, [i, f, g, o])  # an invalid step's too, as the reference saves them
        return h_new, c_new

    _loop(steps, read, advance, (h0_ref[...], c0_ref[...]), ahead)


def _lstm_backward_kernel(w_ref, gates_ref, cs_ref, c0_ref, g_hs_ref, g_h_ref, g_c_ref, *refs, steps, reverse,
                          ahead):
    *valid_ref, g_z_ref, g_h0_ref, g_c0_ref = refs
    hidden = c0_ref.shape[-1]
    w_h = _blocks(w_ref, (slice(None),), 4, hidden)
    c0 = c0_ref[...]
    back = not reverse

    def read(s):  # the step's gates, the cell state entering it, its output's cotangent
        t = _read_time(s, steps, back)
        return (*_blocks(gates_ref, (t, slice(None)), 4, hidden), _state_before(s, steps, back, cs_ref, c0),
                g_hs_ref[t, :, :], *_mask_at(valid_ref, t))

    def advance(s, state, i, f, g, o, c_prev, g_hs_t, *valid_t):
        g_h, g_c, c = state  # the carry's cotangents, and the cell state this step made
        keep = _keep(valid_t)
        g_h = g_h + g_hs_t
        tanh_c = jnp.tanh(c)
        g_c_total = g_c + g_h * o * (1 - tanh_c * tanh_c)
        g_z = [g_c_total * g * i * (1 - i), g_c_total * c_prev * f * (1 - f), g_c_total * i * (1 - g * g),
               g_h * tanh_c * o * (1 - o)]
        g_z = [_kept(keep, block, 0.0) for block in g_z]
        _store_blocks(g_z_ref, _time(s, steps, back), g_z)
        return _kept(keep, _times_w_transposed(g_z, w_h), g_h), _kept(keep, g_c_total * f, g_c), c_prev

    first = cs_ref[_time(0, steps, back), :, :]
    g_h0_ref[...], g_c0_ref[...], _ = _loop(steps, read, advance, (g_h_ref[...], g_c_ref[...], first), ahead)


# --- the GRU (cuDNN's convention: gates r, z, n; a = h W_h + b_h) ---------------------------------------------------


def _gru_forward_kernel(w_ref, b_ref, h0_ref, px_ref, *refs, steps, reverse, ahead):
    *valid_ref, hs_ref, gates_ref, a_n_ref = refs
    hidden = h0_ref.shape[-1]
    w_h = _blocks(w_ref, (slice(None),), 3, hidden)
    b_h = [b[None, :] for b in _blocks(b_ref, (), 3, hidden)]

    def read(s):
        t = _read_time(s, steps, reverse)
        return (*_blocks(px_ref, (t, slice(None)), 3, hidden), *_mask_at(valid_ref, t))

    def advance(s, h, x_r, x_z, x_n, *valid_t):
        a_r, a_z, a_n = (hw + b for hw, b in zip(_times_w(h, w_h), b_h))
        r, z = jax.nn.sigmoid(x_r + a_r), jax.nn.sigmoid(x_z + a_z)
        n = jnp.tanh(x_n + r * a_n)
        h_new = _kept(_keep(valid_t), (1.0 - z) * n + z * h, h)
        t = _time(s, steps, reverse)
        hs_ref[t, :, :] = h_new
        _store_blocks(gates_ref, t, [r, z, n])
        a_n_ref[t, :, :] = a_n
        return h_new

    _loop(steps, read, advance, h0_ref[...], ahead)


def _gru_backward_kernel(w_ref, gates_ref, a_n_ref, hs_ref, h0_ref, g_hs_ref, g_h_ref, *refs, steps, reverse, ahead):
    *valid_ref, g_u_ref, g_h0_ref = refs
    hidden = h0_ref.shape[-1]
    w_h = _blocks(w_ref, (slice(None),), 3, hidden)
    h0 = h0_ref[...]
    back = not reverse

    def read(s):  # the step's gates and a_n, the state entering it, its output's cotangent
        t = _read_time(s, steps, back)
        return (*_blocks(gates_ref, (t, slice(None)), 3, hidden), a_n_ref[t, :, :],
                _state_before(s, steps, back, hs_ref, h0), g_hs_ref[t, :, :], *_mask_at(valid_ref, t))

    def advance(s, g_carry, r, z, n, a_n, h_prev, g_hs_t, *valid_t):
        # The transpose of `fused._gru_tangent_step`: the cotangent of u per block is g ⊙ into_h, and the carry's
        # is (g ⊙ into_h ⊙ [1, 1, r]) W_hᵀ + z ⊙ g.
        keep = _keep(valid_t)
        g = g_carry + g_hs_t
        new_coeff = (1 - z) * (1 - n * n)
        g_u = [g * new_coeff * r * (1 - r) * a_n, g * (h_prev - n) * z * (1 - z), g * new_coeff]
        g_u = [_kept(keep, block, 0.0) for block in g_u]
        _store_blocks(g_u_ref, _time(s, steps, back), g_u)
        recurrent = _times_w_transposed([g_u[0], g_u[1], g_u[2] * r], w_h)
        return _kept(keep, recurrent + z * g, g)

    g_h0_ref[...] = _loop(steps, read, advance, g_h_ref[...], ahead)


# --- calls ------------------------------------------------------------------------------------------------------------


def _padded_rows(batch: int) -> int:
    return -(-batch // ROWS) * ROWS


def _call(kernel, args, out_shapes, batch_axes, out_batch_axes, interpret):
    """``kernel`` over programs of `ROWS` rows: the batch padded to a multiple of `ROWS` (padded rows are zero and
    stay zero: none of the activations moves 0) and cut back after."""
    from jax.experimental import pallas as pl

    batch = next(a.shape[axis] for a, axis in zip(args, batch_axes) if axis is not None)
    padded = _padded_rows(batch)
    args = [a if axis is None else jnp.pad(a, [(0, padded - batch if d == axis else 0) for d in range(a.ndim)])
            for a, axis in zip(args, batch_axes)]

    def spec(shape, axis):
        if axis is None:
            return pl.BlockSpec(shape, lambda b: (0,) * len(shape))
        block = shape[:axis] + (ROWS,) + shape[axis + 1:]
        return pl.BlockSpec(block, lambda b, axis=axis, rank=len(shape): tuple(b if d == axis else 0
                                                                                for d in range(rank)))

    out_full = [jax.ShapeDtypeStruct(s[:axis] + (padded,) + s[axis + 1:], jnp.float32)
                for s, axis in zip(out_shapes, out_batch_axes)]
    outs = pl.pallas_call(
        kernel, grid=(padded // ROWS,),
        in_specs=[spec(a.shape, axis) for a, axis in zip(args, batch_axes)],
        out_specs=[spec(o.shape, axis) for o, axis in zip(out_full, out_batch_axes)],
        out_shape=out_full, interpret=interpret,
        **({} if interpret else {"compiler_params": _compiler_params()}))(*args)
    return [jax.lax.slice_in_dim(o, 0, batch, axis=axis) for o, axis in zip(outs, out_batch_axes)]


def _run(kernel, operands, batch_axes, out_shapes, out_batch_axes, valid, interpret, **params):
    """``kernel`` (with ``params``, each step's inputs read ahead where `read_ahead`) on ``operands`` and, with a
    padding mask, ``valid [T, B]`` (booleans; the kernels read float32 ones and zeros) after them. The steps are
    the leading axis of the operands ``[T, B, ...]`` (batch axis 1)."""
    steps = next(a.shape[0] for a, axis in zip(operands, batch_axes) if axis == 1)
    mask = [] if valid is None else [jnp.asarray(valid, jnp.float32)]
    kernel = functools.partial(kernel, steps=steps, ahead=read_ahead(), **params)
    return _call(kernel, [*operands, *mask], out_shapes, [*batch_axes, *[1] * len(mask)], out_batch_axes, interpret)


# Each takes its primitive's operands (the mask apart, given as ``valid``) and returns the primitive's results, the
# backward ones without W_h's gradient.


def rnn_forward(w_h, h0, px, valid=None, *, reverse: bool, activation: str, interpret: bool = False):
    """``[hs]``, ``hs [T, B, H]`` of ``h_t = φ(px_t + h_{t-1} W_h)`` (``w_h [H, H]``, ``h0 [B, H]``, ``px [T, B,
    H]``)."""
    return _run(_rnn_forward_kernel, [w_h, h0, px], [None, 0, 1], [px.shape], [1], valid, interpret,
                reverse=reverse, activation=activation)


def rnn_backward(w_h, hs, h0, g_hs, g_h, valid=None, *, reverse: bool, activation: str, interpret: bool = False):
    """``[g_z [T, B, H], g_h0 [B, H]]``: the cotangents of ``px`` and ``h0`` given those of ``hs`` and of the last
    carry, ``g_hs [T, B, H]`` and ``g_h [B, H]``."""
    return _run(_rnn_backward_kernel, [w_h, hs, g_hs, g_h], [None, 1, 1, 0], [hs.shape, g_h.shape],
                [1, 0], valid, interpret, reverse=reverse, activation=activation)


def lstm_forward(w_h, h0, c0, px, valid=None, *, reverse: bool, interpret: bool = False):
    """``[hs, cs, gates]`` (``[T, B, H]``, ``[T, B, H]``, ``[T, B, 4H]``) from ``w_h [H, 4H]``, ``h0``, ``c0`` and
    ``px [T, B, 4H]``."""
    sequence = px.shape[:2] + h0.shape[-1:]
    return _run(_lstm_forward_kernel, [w_h, h0, c0, px], [None, 0, 0, 1], [sequence, sequence, px.shape],
                [1, 1, 1], valid, interpret, reverse=reverse)


def lstm_backward(w_h, gates, cs, c0, hs, h0, g_hs, g_h, g_c, valid=None, *, reverse: bool, interpret: bool = False):
    """``[g_z [T, B, 4H], g_h0, g_c0]``: the cotangents of ``px`` and of the first carry given those of ``hs`` and of
    the last carry (``hs`` and ``h0`` enter W_h's gradient only)."""
    return _run(_lstm_backward_kernel, [w_h, gates, cs, c0, g_hs, g_h, g_c], [None, 1, 1, 0, 1, 0, 0],
                [gates.shape, g_h.shape, g_c.shape], [1, 0, 0], valid, interpret, reverse=reverse)


def gru_forward(w_h, b_h, h0, px, valid=None, *, reverse: bool, interpret: bool = False):
    """``[hs, gates, a_n]`` (``[T, B, H]``, ``[T, B, 3H]``: r, z, n, ``[T, B, H]``: the n block of ``h W_h + b_h``)
    from ``w_h [H, 3H]``, ``b_h [3H]``, ``h0`` and ``px [T, B, 3H]``."""
    sequence = px.shape[:2] + h0.shape[-1:]
    return _run(_gru_forward_kernel, [w_h, b_h, h0, px], [None, None, 0, 1],
                [sequence, px.shape, sequence], [1, 1, 1], valid, interpret, reverse=reverse)


def gru_backward(w_h, gates, a_n, hs, h0, g_hs, g_h, valid=None, *, reverse: bool, interpret: bool = False):
    """``[g_u [T, B, 3H], g_h0]``: the cotangents of the tangent's ``u`` and of ``h0`` given those of ``hs`` and of
    the last carry."""
    return _run(_gru_backward_kernel, [w_h, gates, a_n, hs, h0, g_hs, g_h],
                [None, 1, 1, 1, 0, 1, 0], [gates.shape, g_h.shape], [1, 0], valid, interpret, reverse=reverse)
