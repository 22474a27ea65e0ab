r"""Gradient flow through any cell, in the log domain.

Vanishing gradients underflow float32 (near 1e-38) within a few hundred steps of a contracting RNN, and exploding
ones overflow it. Every quantity here is therefore carried as a unit-norm vector (or orthonormal frame) times a
scale whose base-10 logarithm is accumulated step by step (with Kahan compensation, so the sum of 10^4 float32 logs
stays accurate to ~1e-7 relative). A gain-0.5 RNN at T = 3000 has ``||∂L/∂h_0|| ≈ 1e-903``: we return ``-903.x``.

Conventions: ``h_t`` is the hidden state after consuming ``x_t`` (``t = 0 … T-1``); the *lag* of step ``t`` is
``T - 1 - t``. The functions take any cell following the protocol of `rnnlab.cells`; they use only
``initial_carry``, the step (or ``project_inputs`` + ``recur``) and ``hidden``, which must select part of the carry.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from rnnlab import fused, native
from rnnlab.scan import in_one_dtype, prepare, scan, step_and_inputs

_NEG_INF = -jnp.inf
_LOG10_2 = math.log10(2.0)


def measure_dtype(dtype) -> jnp.dtype:
    """The dtype norms, their logs, the accumulated log scales and the Jacobian spectra are kept in: ``dtype`` or
    float32, whichever is wider. A cell in bfloat16 or float16 propagates its cotangents in its own dtype, as its
    backward pass does, but a log scale summed over thousands of steps in bfloat16 stalls (at 4 its spacing is 0.03,
    against a step's 0.004)."""
    return jnp.promote_types(dtype, jnp.float32)


def _log10_norm(tree) -> jax.Array:
    """log10 of the tree's norm, in `measure_dtype`: -inf for zero (with a zero derivative there, not log10's
    0·inf), nan for nan."""
    leaves = [leaf.astype(measure_dtype(leaf.dtype)) for leaf in jax.tree_util.tree_leaves(tree)]
    squares = sum(jnp.sum(jnp.square(leaf)) for leaf in leaves)
    zero = squares == 0
    return jnp.where(zero, _NEG_INF, 0.5 * jnp.log10(jnp.where(zero, 1.0, squares)))


def _exp10(exponent, unused, otherwise: float = 0.0) -> jax.Array:
    """``10^exponent``, or ``otherwise`` where ``unused``, whose exponent (±inf, say) never reaches the power: in a
    derivative an unused ``10^inf`` would still give 0·inf = nan (`jax.grad` of a loss that leaves a zero
    cotangent)."""
    return jnp.where(unused, otherwise, 10.0 ** jnp.where(unused, 0.0, exponent))


def _log10_norm_of_small(tree) -> jax.Array:
    """`_log10_norm`, taken after dividing by the largest element, so that elements whose squares fall below
    float32's range still count (a loss's direct term at 1e-30 was read as no term: found against the kernel's and
    float64's numbers; outside a compiled program float32 also flushes squares below 1.2e-38 to 0). A sum of squares
    past float32's range stays inf, as the rest of the engine and the kernel read it (undefined: nan follows); zero
    stays -inf."""
    leaves = [leaf.astype(measure_dtype(leaf.dtype)) for leaf in jax.tree_util.tree_leaves(tree)]
    plain = _log10_norm(leaves)
    top = jnp.max(jnp.asarray([jnp.max(jnp.abs(leaf)) for leaf in leaves]))
    usable = (top > 0) & (plain < jnp.inf)  # not past float32 (inf), not nan
    safe = jnp.where(usable, top, 1.0).astype(top.dtype)  # no 0 / 0, in the value or its derivative
    scaled = jnp.log10(safe) + _log10_norm([jnp.where(usable, leaf, 1.0) / safe for leaf in leaves])
    return jnp.where(usable, scaled, plain)


def _scale(tree, factor):
    """Each leaf times ``factor`` (in `measure_dtype`), multiplied in that dtype and rounded to the leaf's once. A
    bfloat16 leaf times ``factor`` rounded to bfloat16 would carry that rounding (2^-9) into the scale at every
    step, a random walk over the steps; rounding the product is what the cell's own arithmetic does to its
    cotangent, at any scale. float32 and float64 leaves: their plain product."""
    return jax.tree_util.tree_map(lambda leaf: (leaf.astype(factor.dtype) * factor).astype(leaf.dtype), tree)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]))


def _kahan_add(total, compensation, value):
    """One step of Kahan summation: ``total + value`` with the rounding error carried in ``compensation``."""
    corrected = value - compensation
    new_total = total + corrected
    return new_total, (new_total - total) - corrected


def _forward(cell, params, xs, carry):
    """Checked inputs, the step, the carry before each step ``[T, ...]`` and the final carry."""
    xs, carry, _ = prepare(cell, params, xs, carry)
    step, inputs = step_and_inputs(cell, params, xs)

    def advance(carry, x):
        new_carry, _ = step(carry, x)
        return new_carry, carry

    final, before = jax.lax.scan(advance, carry, inputs)
    return xs, step, inputs, before, final


def default_loss(hs: jax.Array) -> jax.Array:
    """``L = Σ h_T² / batch``: a loss on the last hidden state only, the classic vanishing-gradient setting.

    ``hs [T, *batch, H]``; ``batch`` is the number of sequences (1 for an unbatched ``[T, H]``).
    """
    return jnp.sum(jnp.square(hs[-1])) / math.prod(hs.shape[1:-1])


def _add_scaled(state, term):
    """``10^s · c + term`` for ``state = (c, s, kahan)`` with ``||c|| = 1``, kept as a unit vector and a log10 scale.

    Both parts are scaled to the larger before adding, and the term is unit-normalised in two half steps, so neither
    a tiny scale (1e-900) nor a tiny or denormal term under- or overflows (`_log10_norm_of_small`: until 2026-11-27
    a term below about 1e-19 was read as zero, found against the kernel's and float64's numbers).
    """
    cotangent, log_scale, compensation = state
    log_term = _log10_norm_of_small(term)
    new_scale = jnp.maximum(log_scale, log_term)
    old_weight = _exp10(log_scale - new_scale, log_scale == _NEG_INF)
    half_inverse = _exp10(-0.5 * log_term, log_term == _NEG_INF)
    term_unit = _scale(_scale(term, half_inverse), half_inverse)
    term_weight = _exp10(log_term - new_scale, log_term == _NEG_INF)
    cotangent = jax.tree_util.tree_map(
        lambda c, d: c * old_weight.astype(c.dtype) + d * term_weight.astype(d.dtype), cotangent, term_unit
    )
    term_wins = log_term > log_scale
    # A term of norm nan or inf (a loss gradient at an overflowed state) leaves nothing defined: the scale says nan.
    undefined = jnp.isnan(log_term) | (log_term == jnp.inf)
    log_scale = jnp.where(undefined, jnp.nan, jnp.where(term_wins, log_term, log_scale))
    return cotangent, log_scale, jnp.where(term_wins, 0.0, compensation)


def _renormalise(state):
    """Divide the cotangent by its norm and add the norm's log10 to the scale; a zero cotangent gets scale -inf, one
    whose norm overflows float32 scale nan (undefined: it would otherwise be scaled to 0 and read as vanished).

    A cotangent narrower than its scale (bfloat16, float16: `measure_dtype`) is divided by the power of two nearest
    its norm instead, which is exact (in float16, unless an element becomes subnormal), and keeps a norm between 0.7
    and 1.4. Its own dtype's rounding of ``c / ||c||`` is not: ``c`` lies on the bfloat16 grid and the factor is near
    1, so every element moves the same way; with ``W = 0.999·Q`` that drifted 0.48 from JAX's own bfloat16 backward
    pass by lag 2000 (`test_bfloat16_grad_norms_equal_plain_bfloat16_autodiff_over_2000_steps`). The scale then
    carries no derivative (its steps are whole powers of two); the cotangent carries all of it."""
    cotangent, log_scale, compensation = state
    log_norm = _log10_norm(cotangent)
    is_zero = log_norm == _NEG_INF
    if any(leaf.dtype != log_norm.dtype for leaf in jax.tree_util.tree_leaves(cotangent)):
        twos = jnp.round(log_norm / _LOG10_2)  # ±inf and nan stay
        log_norm = jnp.where(jnp.isfinite(twos), twos * _LOG10_2, log_norm)
        factor = jnp.where(is_zero, 1.0, jnp.exp2(-jnp.where(is_zero, 0.0, twos)))
    else:
        factor = _exp10(-log_norm, is_zero, 1.0)
    cotangent = _scale(cotangent, factor)
    log_scale, compensation = _kahan_add(log_scale, compensation, jnp.where(is_zero, 0.0, log_norm))
    log_scale = jnp.where(log_norm == jnp.inf, jnp.nan, log_scale)
    return cotangent, jnp.where(is_zero, _NEG_INF, log_scale), compensation


def _linearise(cell, params, xs: jax.Array, carry, unroll: int = 1):
    """Run the cell over ``xs [T, N, input_size]`` from ``carry`` (``unroll`` steps per loop iteration), keeping
    what the backward pass needs.

    **Returns:** ``(final_carry, before, per_step, transpose)``: ``before`` the carry before each step, and
    ``transpose(cotangent, after, per_step[t])`` the cotangent of the carry before step ``t`` given the one after it
    (and ``after``, that carry), with the carry before the step. The built-in cells use `rnnlab.fused`'s
    coefficients (one matmul and one elementwise pass per step, no matmul recomputed); any other cell the vjp of its
    step at the stored carry.
    """
    if fused.supports(cell, params, carry, xs):
        return fused.linearised_steps(cell, params, carry, xs, unroll=unroll)
    step, inputs = step_and_inputs(cell, params, xs)

    def advance(carry, x):
        return step(carry, x)[0], carry

    final, before = jax.lax.scan(advance, carry, inputs, unroll=unroll)

    def transpose(cotangent, after, carry_and_input):
        carry_before, x = carry_and_input
        _, step_vjp = jax.vjp(lambda c: step(c, x)[0], carry_before)
        return step_vjp(cotangent)[0], carry_before

    return final, before, (before, inputs), transpose


def grad_norms(cell, params, xs: jax.Array, *, loss: Callable[[jax.Array], jax.Array] | None = None, carry=None,
               remat: int | None = None):
    """``log10 ||∂L/∂h_t||`` for every step ``t``, from one backward pass in the log domain.

    **Arguments:**

    - ``cell``, ``params``: any cell and its parameters (``cell.hidden`` must select part of the carry).
    - ``xs``: ``[T, *batch, input_size]``, time-major.
    - ``loss``: a scalar function of all hidden states ``hs [T, *batch, H]`` (for the built-in cells these are the
      outputs ``ys`` of `rnnlab.scan`). Default `default_loss`, ``Σ h_T² / batch``.
    - ``carry``: the initial carry (zeros by default).
    - ``remat``: a chunk length dividing ``T``: only the carries at chunk boundaries are kept and each chunk's are
      recomputed on the way back, so memory grows as ``T / remat + remat`` carries instead of ``T`` (``remat ≈ √T``
      for very long sequences; with the default loss nothing else of size ``T`` is stored).

    **Returns:** ``[T]``: ``log10`` of the Frobenius norm (over batch and features) of the total derivative of ``L``
    with respect to ``h_t``, through every later step and the direct dependence of ``L`` on ``h_t`` — the value
    PyTorch's ``h_t.retain_grad()`` would give, where float32 can represent it. ``-inf`` where it is exactly zero;
    ``nan`` where a state ``h_t … h_T`` it depends on is not finite (the forward pass overflowed: the gradient is
    undefined there, so it is never reported as 0). In float32, or float64 for a float64 cell: a bfloat16 or float16
    cell's cotangent runs in its own dtype, as its backward pass would (within 0.06 of torch's bfloat16 retain_grad
    where that is a normal number, tested), scaled by powers of two, while norms, logs and the scale are kept in
    float32 (`measure_dtype`). Differentiable with respect to ``params`` and ``xs`` (`jax.grad`,
    `jax.jvp`): the finite norms' derivatives are finite also where a loss leaves the cotangent exactly zero
    (select the finite norms with ``jnp.where(jnp.isfinite(norms), norms, 0.0)`` before summing them).

    The backward (cotangent) vector is renormalised after every step and the log of its norm accumulated, so the
    result is exact far beyond float32's range. For the built-in cells a backward step applies the step's Jacobian
    from coefficients saved by the forward loop (`rnnlab.fused`), so nothing is recomputed; with the default loss
    the whole measurement is one call of `rnnlab.native`'s gradient-flow kernel (C++ on CPU in float32, the same
    maths on XLA elsewhere; with ``remat`` it keeps the carry before each chunk and runs the chunk's steps again on
    the way back), which under `jax.vmap` runs every configuration of a sweep at once. With a ``loss`` of yours and a
    built-in cell, a forward pass (`rnnlab.scan`) gives the states, JAX the loss's direct cotangents ``[T, *batch,
    H]``, and the same kernel adds each step's at the cotangent's scale. Where the sequences are split
    over devices (``xs``'s type splits its batch in `jax.sharding`'s explicit mode, or within
    `rnnlab.split_batch`), each device runs it on its own and the squared norms are summed at the end (``nan`` is
    then decided per device: states that overflow where that device's gradient is exactly zero do not make the
    others' ``nan``).
    """
    xs, carry, batch_shape = _flattened(cell, params, xs, carry)
    params, xs = in_one_dtype(cell, params, xs, carry)  # mixed float dtypes: as one, for the kernel
    seq_len = xs.shape[0]
    if remat is not None and (not isinstance(remat, int) or remat < 1 or seq_len % remat):
        raise ValueError(f"remat must be a positive int dividing T = {seq_len}, got {remat!r}.")
    if not _in_kernel(cell, params, carry, xs):
        return log_domain_norms(cell, params, xs, carry, loss=loss, remat=remat, batch_shape=batch_shape)
    if loss is None:
        return native.grad_norms(cell, params, xs, carry, remat)
    # A loss of the user's: its direct cotangents from the states of a forward pass (the cell kernels'), then the
    # gradient-flow kernel adding each step's at the cotangent's scale.
    direct = _direct_cotangents(loss, scan(cell, params, xs, carry=carry)[0], batch_shape)
    return native.grad_norms_direct(cell, params, xs, carry, direct, remat)


def _direct_cotangents(loss, hs: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
    """∂L/∂h_t through ``loss``'s own dependence on the states ``hs [T, N, H]`` (batch flattened to ``N``), each
    step's alone: ``[T, N, H]``."""
    return jax.grad(lambda flat: loss(flat.reshape(flat.shape[:1] + batch_shape + flat.shape[-1:])))(hs)


def _flattened(cell, params, xs: jax.Array, carry):
    """Checked inputs ``[T, N, input_size]`` and carry with the batch flattened to one axis ``N`` (norms do not
    depend on its shape, and the fused kernels want ``[N, ...]``), and the batch's shape."""
    xs, carry, _ = prepare(cell, params, xs, carry)
    batch_shape = xs.shape[1:-1]
    batch = math.prod(batch_shape)
    carry = jax.tree_util.tree_map(lambda leaf: leaf.reshape((batch,) + leaf.shape[len(batch_shape):]), carry)
    return xs.reshape(xs.shape[0], batch, xs.shape[-1]), carry, batch_shape


def _in_kernel(cell, params, carry, xs: jax.Array) -> bool:
    """Whether `rnnlab.native`'s gradient-flow kernel measures ``cell`` on ``xs [T, N, input_size]`` (with the
    default loss, with or without remat): a built-in cell with one float dtype, at least one step and one sequence,
    and the kernels switched on (`rnnlab.native.enabled`). It lowers to the XLA engine where the C++ kernel does not
    apply."""
    return xs.shape[0] > 0 and xs.shape[1] > 0 and fused.supports(cell, params, carry, xs) and native.enabled()


def grad_norms_of_configs(cell, params, xs: jax.Array, which) -> jax.Array:
    """``log10 ||∂L/∂h_t|| [C, T]`` of C configurations of ``cell`` (`grad_norms` with its default loss and a zero
    initial carry): ``params`` stacked on a leading axis, configuration ``c`` on the inputs ``xs[:, which[c]]``
    (``xs [T, U, *batch, input_size]``, ``which [C]`` ints).

    A sweep's gains share their seed's inputs: for the built-in cells every configuration reads its sequence in
    place, in one call of the native kernel (no copy of the inputs per configuration); any other cell runs
    `grad_norms` under `jax.vmap`.
    """
    which = jnp.asarray(which, jnp.int32)
    one = jax.tree_util.tree_map(lambda leaf: leaf[0], params)
    first, carry, _ = _flattened(cell, one, xs[:, 0], None)
    if not _in_kernel(cell, one, carry, first):
        return jax.vmap(lambda p, sequence: grad_norms(cell, p, xs[:, sequence]))(params, which)
    flat_xs = xs.reshape(xs.shape[:2] + first.shape[1:])
    stacked = jax.tree_util.tree_map(lambda leaf: jnp.broadcast_to(leaf, which.shape + leaf.shape), carry)
    return native.grad_norms_of_configs(cell, params, stacked, flat_xs, which)


def log_domain_norms(cell, params, xs: jax.Array, carry, *, loss=None, remat: int | None = None,
                     batch_shape: tuple[int, ...] | None = None, unroll: int = 1,
                     direct: jax.Array | None = None) -> jax.Array:
    """`grad_norms` on XLA for ``xs [T, N, input_size]`` and ``carry`` with the batch flattened to ``N``
    (``batch_shape``: its shape for ``loss``, default ``(N,)``): the plain engine, and the reference of the
    gradient-flow kernel. ``unroll``: steps per iteration of every loop over steps (the numbers do not change).
    ``direct``: in place of ``loss``, its direct cotangents ``[T, N, H]`` (∂L/∂h_t through L's own dependence on
    h_t alone)."""
    seq_len = xs.shape[0]
    batch_shape = xs.shape[1:-1] if batch_shape is None else batch_shape
    if remat:  # keep the carry before every chunk of `remat` steps; chunks are linearised again on the way back
        step, _ = step_and_inputs(cell, params, xs, hoist=False)
        by_chunk = xs.reshape((seq_len // remat, remat) + xs.shape[1:])

        def advance_chunk(carry, chunk_xs):
            return jax.lax.scan(lambda c, x: (step(c, x)[0], None), carry, chunk_xs, unroll=unroll)[0], carry

        final, chunk_starts = jax.lax.scan(advance_chunk, carry, by_chunk)
        before = None if loss is None or direct is not None else jax.lax.scan(
            lambda c, x: (step(c, x)[0], c), carry, xs, unroll=unroll)[1]
    else:
        final, before, per_step, transpose = _linearise(cell, params, xs, carry, unroll)
    # cell.hidden selects part of the carry, so its transpose injects ∂L/∂h into a carry-shaped cotangent.
    _, hidden_vjp = jax.vjp(cell.hidden, final)
    h_final = cell.hidden(final)
    scale_dtype = measure_dtype(h_final.dtype)
    zero = jax.tree_util.tree_map(jnp.zeros_like, final)
    state = (zero, jnp.asarray(_NEG_INF, scale_dtype), jnp.zeros((), scale_dtype))
    if direct is None and loss is None:
        # Only the last step has a direct term: it starts the backward pass, and nothing of size T is stored.
        state = _add_scaled(state, hidden_vjp(jax.grad(lambda h: default_loss(h[None]))(h_final))[0])
    elif direct is None:
        direct = _direct_cotangents(loss, jnp.concatenate([jax.vmap(cell.hidden)(before)[1:], h_final[None]]),
                                    batch_shape)

    def backward_steps(state_and_diverged, transpose, after, per_step, direct, length):
        def backward_step(state_after_diverged, per_step_t):
            state, after, diverged = state_after_diverged
            step_data, direct_t = per_step_t
            if direct_t is not None:
                state = _add_scaled(state, hidden_vjp(direct_t)[0])
            state = _renormalise(state)
            cotangent, log_scale, compensation = state
            # A non-zero cotangent meeting a state that is not finite (the forward pass overflowed) makes ∂L/∂h_t
            # and every earlier one undefined: nan says so, whatever the arithmetic made of inf and nan (a ReLU's
            # derivative at nan is 0, which would read as an exactly vanished gradient).
            diverged = diverged | (~_all_finite(after) & (log_scale != -jnp.inf))
            log10_grad_norm = jnp.where(diverged, jnp.nan, log_scale + _log10_norm(cell.hidden(cotangent)))
            cotangent, before = transpose(cotangent, after, step_data)
            return ((cotangent, log_scale, compensation), before, diverged), log10_grad_norm

        state, diverged = state_and_diverged
        (state, _, diverged), log10_norms = jax.lax.scan(backward_step, (state, after, diverged), (per_step, direct),
                                                         length=length, reverse=True, unroll=unroll)
        return (state, diverged), log10_norms

    if not remat:
        return backward_steps((state, jnp.asarray(False)), transpose, final, per_step, direct, seq_len)[1]

    def backward_chunk(state_and_diverged, per_chunk):
        chunk_start, chunk_xs, chunk_direct = per_chunk
        chunk_end, _, per_step, transpose = _linearise(cell, params, chunk_xs, chunk_start, unroll)
        return backward_steps(state_and_diverged, transpose, chunk_end, per_step, chunk_direct, remat)

    by_chunk_direct = None if direct is None else direct.reshape((seq_len // remat, remat) + direct.shape[1:])
    _, log10_norms = jax.lax.scan(backward_chunk, (state, jnp.asarray(False)), (chunk_starts, by_chunk, by_chunk_direct),
                                  reverse=True)
    return log10_norms.reshape(seq_len)


def _gram_schmidt(vectors: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Orthonormalise the columns of ``vectors [n, k]``: ``(Q [n, k], log10 |diag R| [k])`` with ``vectors = Q R``.

    Modified Gram–Schmidt, run twice ("twice is enough", Giraud et al. 2005) for orthogonality to rounding. Written
    with matmuls only: a batched LAPACK QR inside a large jitted program has hung JAX's CPU thread pool.
    """

    def one_pass(matrix):
        n_cols = matrix.shape[1]

        def column(j, state):
            basis, log_diag = state
            v = matrix[:, j]
            done = (jnp.arange(n_cols) < j).astype(matrix.dtype)
            v = v - basis @ (done * (basis.T @ v))
            norm = jnp.linalg.norm(v)
            v = v / jnp.where(norm > 0, norm, 1.0)
            return basis.at[:, j].set(v), log_diag.at[j].set(jnp.log10(norm))

        init = (jnp.zeros_like(matrix), jnp.zeros((n_cols,), matrix.dtype))
        return jax.lax.fori_loop(0, n_cols, column, init)

    basis, log_diag = one_pass(vectors)
    basis, correction = one_pass(basis)
    return basis, log_diag + correction


def _single_sequence(name, cell, params, xs, carry):
    xs = jnp.asarray(xs)
    if xs.ndim != 2:
        raise ValueError(f"{name} takes one sequence, xs: [T, input_size]; got shape {xs.shape} (vmap for many).")
    return _forward(cell, params, xs, carry)


def _in_measure_dtype(cell, params, xs: jax.Array, step, inputs, carries):
    """``(step, inputs, carries)`` of `_forward` in `measure_dtype` (``carries``: any of its carries): a bfloat16 or
    float16 cell's step Jacobians are taken in float32 at its own trajectory's states. A frame rounded into bfloat16
    at every step biased the singular values where a Jacobian returns the frame to the same values: with
    ``W = 0.99·I`` they were 0.6 off at T = 1000. float32 and float64 cells: the arguments as they are."""
    leaves = jax.tree_util.tree_leaves((params, xs, carries))
    wide = measure_dtype(jnp.result_type(*leaves))
    if all(leaf.dtype == wide for leaf in leaves):
        return step, inputs, carries
    widen = lambda tree: jax.tree_util.tree_map(lambda leaf: leaf.astype(wide), tree)  # noqa: E731
    return *step_and_inputs(cell, widen(params), widen(xs)), widen(carries)


def jacobian_norms(cell, params, xs: jax.Array, *, k: int = 1, key: jax.Array | None = None, carry=None):
    """``log10`` of the top-``k`` singular values of ``∂h_{T-1}/∂carry_t`` for one sequence, every ``t``.

    For cells whose carry is the hidden state (RNN, GRU) this is ``∂h_T/∂h_t``; for the LSTM the derivative is
    with respect to the whole carry ``(h_t, c_t)``.

    **Arguments:** ``xs [T, input_size]`` (one sequence; `jax.vmap` for many); ``k`` ≤ hidden size; ``key`` picks
    the random starting frame (fixed by default).

    **Returns:** ``[T, k]``, each row in descending order; row ``T-1`` is zeros (the identity).

    Method: a ``k``-frame of hidden-space directions at ``T-1`` is carried backward through the transposed step
    Jacobians and re-orthonormalised every step (QR by Gram–Schmidt); the logs of ``|R_ii|`` accumulate. These are
    finite-time Lyapunov estimates of the singular values: exact when the step Jacobians share singular vectors (a
    linear RNN with ``W = g·Q``: every value is ``(T-1-t)·log10 g``), converging to the true values as the lag grows
    otherwise, and exact for ``k = 1`` in the limit of long lags. A bfloat16 or float16 cell runs its forward pass in
    its dtype, and its step Jacobians are taken in float32 at those states (`measure_dtype`).
    """
    xs, step, inputs, before, last = _single_sequence("jacobian_norms", cell, params, xs, carry)
    step, inputs, (before, last) = _in_measure_dtype(cell, params, xs, step, inputs, (before, last))
    flat_last, unravel = ravel_pytree(last)
    hidden_size = cell.hidden(last).shape[-1]
    if not 1 <= k <= hidden_size:
        raise ValueError(f"k must lie in [1, hidden size {hidden_size}], got {k}.")
    key = jax.random.PRNGKey(0) if key is None else key
    start, _ = _gram_schmidt(jax.random.normal(key, (hidden_size, k), flat_last.dtype))
    _, hidden_vjp = jax.vjp(lambda flat: cell.hidden(unravel(flat)), flat_last)
    frame = jax.vmap(lambda v: hidden_vjp(v)[0], in_axes=1, out_axes=1)(start)  # [C, k] in carry space

    def backward(state, per_step):
        frame, log_values = state
        carry_before, x = per_step
        flat_before, _ = ravel_pytree(carry_before)
        _, step_vjp = jax.vjp(lambda flat: ravel_pytree(step(unravel(flat), x)[0])[0], flat_before)
        moved = jax.vmap(lambda v: step_vjp(v)[0], in_axes=1, out_axes=1)(frame)
        frame, log_diag = _gram_schmidt(moved)
        return (frame, log_values + log_diag), log_values

    init = (frame, jnp.zeros((k,), flat_last.dtype))
    _, log_values = jax.lax.scan(backward, init, (before, inputs), reverse=True)
    return -jnp.sort(-log_values, axis=-1)


def lyapunov_exponents(cell, params, xs: jax.Array, *, k: int, key: jax.Array | None = None, carry=None):
    """The top-``k`` Lyapunov exponents of the driven dynamics ``carry_t = F(carry_{t-1}, x_t)`` (Benettin et al.
    1980): natural log per step, in descending order, ``[k]``.

    A ``k``-frame of tangent vectors is pushed forward through the step Jacobians (`jax.jvp`) and re-orthonormalised
    every step; ``λ_i = (1/T) Σ_t ln |R_ii(t)|``. All exponents below zero: ordered dynamics and vanishing
    gradients; the largest above zero: chaos, and gradients that explode at the same rate. ``xs [T, input_size]``,
    one sequence; a finite-``T`` estimate whose error shrinks as ``1/√T`` or faster. A bfloat16 or float16 cell's
    Jacobians are taken in float32 at its own trajectory's states (`jacobian_norms`).
    """
    xs, step, inputs, before, _ = _single_sequence("lyapunov_exponents", cell, params, xs, carry)
    step, inputs, before = _in_measure_dtype(cell, params, xs, step, inputs, before)
    first = jax.tree_util.tree_map(lambda a: a[0], before)
    flat_first, unravel = ravel_pytree(first)
    if not 1 <= k <= flat_first.shape[0]:
        raise ValueError(f"k must lie in [1, carry size {flat_first.shape[0]}], got {k}.")
    key = jax.random.PRNGKey(0) if key is None else key
    frame, _ = _gram_schmidt(jax.random.normal(key, (flat_first.shape[0], k), flat_first.dtype))

    def forward(state, per_step):
        frame, log_sum = state
        carry_before, x = per_step
        flat_before, _ = ravel_pytree(carry_before)
        advance = lambda flat: ravel_pytree(step(unravel(flat), x)[0])[0]
        moved = jax.vmap(lambda v: jax.jvp(advance, (flat_before,), (v,))[1], in_axes=1, out_axes=1)(frame)
        frame, log_diag = _gram_schmidt(moved)
        return (frame, log_sum + log_diag), None

    (_, log10_sum), _ = jax.lax.scan(forward, (frame, jnp.zeros((k,), flat_first.dtype)), (before, inputs))
    return -jnp.sort(-log10_sum * jnp.log(10.0) / xs.shape[0])
