"""The plain RNN's recurrence on a GPU as one Pallas (Triton) program per 16 batch rows.

On a GPU, XLA runs a `lax.scan` as a loop whose every iteration launches its kernels and waits for the loop
condition: about 4 µs a step for the tanh RNN at batch 16, hidden 128 on an H200, whatever the step's work (see
benchmarks/README.md, "On a GPU"). Here one program runs all ``T`` steps of its 16 rows, with ``W_h`` loaded once
and held in registers (``[H, H]`` float32, 64 KB at hidden 128), so a step costs a load of its input, one small
matmul, the activation and a store (``RNNLAB_PALLAS_AHEAD=1``: the load issued a step ahead, `read_ahead`).

The forward kernel maps ``(W_h [H, H], h0 [B, H], px [T, B, H])`` to ``hs [T, B, H]``, ``h_t = φ(px_t + h_{t-1}
W_h)``; the backward kernel is the transpose of its tangent: with ``λ`` the cotangent of the carry (``g_h`` at the
last step), ``g_z_t = (g_hs_t + λ) ⊙ φ'(h_t)`` and ``λ ← g_z_t W_hᵀ``, returning ``g_z [T, B, H]`` (the cotangent of
``px``) and ``λ`` at the first step (``h0``'s). ``W_h``'s gradient, ``Σ_t h_{t-1}ᵀ g_z_t``, is one XLA matmul after
the kernel. ``reverse`` runs the recurrence from ``t = T - 1`` down, as `lax.scan` does.

The LSTM and GRU are not here: their ``W_h`` (256 and 192 KB at hidden 128) does not fit in one program's
registers. Read from the L2 cache every step, one program per 16 rows ran the LSTM 2x slower than XLA's loop; four
programs each holding one gate's block and meeting at a barrier every step were 10 % faster than it, forward only
(probes of 2026-11-26 on an H200, benchmarks/README.md).

The kernels' matmuls follow `jax.default_matmul_precision` as XLA's do (`jnp.dot` reads it while tracing): TF32
allowed on a GPU by default, float32 under ``"highest"``.

Pallas's Triton backend is deprecated from jax 0.11 (a DeprecationWarning at each lowering, silenced here: a user
cannot act on it). Where a JAX has none, `applies` is False and the XLA loops run; porting these two kernels to
Mosaic GPU is what keeps them.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

#: Rows of the batch per program: the smallest matmul a Triton dot takes.
ROWS = 16
#: Hidden sizes whose ``W_h`` one program holds in registers (powers of two: Triton's blocks are).
HIDDEN_SIZES = (16, 32, 64, 128)
#: Warps per program: 8 took 7-19 % less time than 4 in the H200 probe.
NUM_WARPS = 8


def applies(w_h_shape, sequence_shape, dtypes, activation) -> bool:
    """Whether the kernels run this recurrence: ``W_h [H, H]`` (one set of weights) with ``H`` in `HIDDEN_SIZES`,
    a sequence ``[T, B, H]`` with rows (``B > 0``) and fewer than 2³¹ elements once padded (Triton's offsets are
    32-bit), float32 throughout, a built-in activation, and a Pallas that lowers to Triton."""
    from rnnlab.fused import _RNN_DERIVATIVES

    steps, batch, hidden = sequence_shape
    return (len(w_h_shape) == 2 and w_h_shape[0] == w_h_shape[1] == hidden and hidden in HIDDEN_SIZES
            and 0 < steps * _padded_rows(batch) * hidden < 2**31 and all(dtype == jnp.float32 for dtype in dtypes)
            and activation in _RNN_DERIVATIVES and _compiler_params() is not None)


@functools.cache
def _compiler_params():
    try:
        from jax.experimental.pallas import triton as pallas_triton
    except ImportError:
        return None
    params = getattr(pallas_triton, "CompilerParams", None) or getattr(pallas_triton, "TritonCompilerParams", None)
    return None if params is None else params(num_warps=NUM_WARPS, num_stages=1)


def read_ahead() -> bool:
    """Whether the kernels read each step's input one step ahead (issued before the step's matmul, used after it):
    ``$RNNLAB_PALLAS_AHEAD`` is ``1``; read while tracing. Not the default: it has not been timed against the kernels
    without it in one run (benchmarks/README.md, "Runs 4-6"); `benchmarks/bench_cells.py` times both on a GPU."""
    return os.environ.get("RNNLAB_PALLAS_AHEAD", "0") == "1"


def _time(step, steps: int, reverse: bool):
    """The time index of loop iteration ``step``."""
    return steps - 1 - step if reverse else step


def _forward_kernel(w_ref, h0_ref, px_ref, *refs, steps, reverse, activation, ahead):
    from rnnlab.cells import _ACTIVATIONS

    *valid_ref, hs_ref = refs  # with a padding mask, ``valid [T, B]`` (1.0 or 0.0) before the output
    phi = _ACTIVATIONS[activation]
    w_h = w_ref[...]  # loaded once: held in registers for all steps

    def read(s):  # step s's inputs; clamped: the read one past the last step (reading ahead) is never used
        t = _time(jnp.minimum(s, steps - 1), steps, reverse)
        return (px_ref[t, :, :], *(valid[t, :] for valid in valid_ref))

    def advance(s, h, px_t, *valid_t):
        new = phi(px_t + jnp.dot(h, w_h, preferred_element_type=jnp.float32))
        if valid_t:  # a row at an invalid step keeps its carry
            new = jnp.where(valid_t[0][:, None] > 0, new, h)
        hs_ref[_time(s, steps, reverse), :, :] = new
        return new

    def step_ahead(s, carry):
        h, inputs = carry
        upcoming = read(s + 1)
        return advance(s, h, *inputs), upcoming

    if ahead:
        jax.lax.fori_loop(0, steps, step_ahead, (h0_ref[...], read(0)))
    else:
        jax.lax.fori_loop(0, steps, lambda s, h: advance(s, h, *read(s)), h0_ref[...])


def _backward_kernel(w_ref, hs_ref, g_hs_ref, g_h_ref, *refs, steps, reverse, activation, ahead):
    from rnnlab.fused import _RNN_DERIVATIVES

    *valid_ref, g_z_ref, g_h0_ref = refs
    derivative = _RNN_DERIVATIVES[activation]
    w_h = w_ref[...]
    # The recurrence ran forward in time for `reverse=False`: its transpose runs the other way.
    back = not reverse

    def read(s):  # clamped, as in the forward kernel
        t = _time(jnp.minimum(s, steps - 1), steps, back)
        return (hs_ref[t, :, :], g_hs_ref[t, :, :], *(valid[t, :] for valid in valid_ref))

    def advance(s, g_carry, h_t, g_h_t, *valid_t):
        g = g_h_t + g_carry
        g_z = g if derivative is None else g * derivative(h_t)
        if valid_t:  # an invalid step: no pre-activation cotangent, the carry's handed on unchanged
            keep = valid_t[0][:, None] > 0
            g_z = jnp.where(keep, g_z, 0.0)
        g_z_ref[_time(s, steps, back), :, :] = g_z
        # g_z W_hᵀ: contract g_z's hidden axis with W_h's output axis.
        g_back = jax.lax.dot_general(g_z, w_h, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return jnp.where(keep, g_back, g) if valid_t else g_back

    def step_ahead(s, carry):
        g_carry, inputs = carry
        upcoming = read(s + 1)
        return advance(s, g_carry, *inputs), upcoming

    if ahead:
        g_h0_ref[...] = jax.lax.fori_loop(0, steps, step_ahead, (g_h_ref[...], read(0)))[0]
    else:
        g_h0_ref[...] = jax.lax.fori_loop(0, steps, lambda s, g: advance(s, g, *read(s)), g_h_ref[...])


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


def _mask(valid):
    """``valid [T, B]`` as the kernels read it (float32 ones and zeros), or no operand."""
    return [] if valid is None else [jnp.asarray(valid, jnp.float32)]


def rnn_forward(w_h, h0, px, valid=None, *, reverse: bool, activation: str, interpret: bool = False):
    """``hs [T, B, H]`` of ``h_t = φ(px_t + h_{t-1} W_h)`` (``w_h [H, H]``, ``h0 [B, H]``, ``px [T, B, H]``); with
    ``valid [T, B]`` (booleans) a row keeps its carry at a step where it is false."""
    steps = px.shape[0]
    kernel = functools.partial(_forward_kernel, steps=steps, reverse=reverse, activation=activation,
                               ahead=read_ahead())
    mask = _mask(valid)
    (hs,) = _call(kernel, [w_h, h0, px, *mask], [px.shape], [None, 0, 1] + [1] * len(mask), [1], interpret)
    return hs


def rnn_backward(w_h, hs, g_hs, g_h, valid=None, *, reverse: bool, activation: str, interpret: bool = False):
    """``(g_z [T, B, H], g_h0 [B, H])``: the cotangents of ``px`` and ``h0`` given those of ``hs`` and of the last
    carry, ``g_hs [T, B, H]`` and ``g_h [B, H]``; with ``valid`` as in `rnn_forward`, an invalid step's ``g_z`` is
    zero and it hands the carry's cotangent (its output's added) to the step before."""
    steps = hs.shape[0]
    kernel = functools.partial(_backward_kernel, steps=steps, reverse=reverse, activation=activation,
                               ahead=read_ahead())
    mask = _mask(valid)
    g_z, g_h0 = _call(kernel, [w_h, hs, g_hs, g_h, *mask], [hs.shape, g_h.shape],
                      [None, 1, 1, 0] + [1] * len(mask), [1, 0], interpret)
    return g_z, g_h0
