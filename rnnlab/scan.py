"""`scan`: run any cell over time with `jax.lax.scan`.

The only function in rnnlab that loops over time. It knows nothing of which cell it runs: it calls
``cell.initial_carry`` and the step (``cell(params, carry, x)``, or ``cell.recur`` on ``cell.project_inputs`` when the
cell hoists its input matmul), and handles batch axes, per-sequence lengths, reversal and rematerialisation.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from rnnlab import fused
from rnnlab.checks import check_float_input, check_input_size


def _broadcast_to_leaf(mask: jax.Array, leaf: jax.Array) -> jax.Array:
    """``mask [*batch]`` reshaped to broadcast against ``leaf [*batch, ...]``."""
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - mask.ndim))


def reverse_padded(xs: jax.Array, lengths: jax.Array) -> jax.Array:
    """Reverse each sequence within its valid length, leaving padded steps in place.

    ``xs [T, *batch, ...]``, ``lengths [*batch]``: step ``t < lengths[b]`` of sequence ``b`` comes from step
    ``lengths[b] - 1 - t``. The map is its own inverse.
    """
    steps = jnp.arange(xs.shape[0]).reshape((-1,) + (1,) * lengths.ndim)
    source = jnp.where(steps < lengths, lengths - 1 - steps, steps)
    source = _broadcast_to_leaf(source, xs)
    return jnp.take_along_axis(xs, jnp.broadcast_to(source, xs.shape), axis=0)


def _check_carry(cell, carry, batch_shape, dtype) -> None:
    expected = jax.eval_shape(lambda: cell.initial_carry(batch_shape, dtype))
    got_tree, want_tree = jax.tree_util.tree_structure(carry), jax.tree_util.tree_structure(expected)
    if got_tree != want_tree:
        raise TypeError(f"carry has structure {got_tree}; {type(cell).__name__} expects {want_tree} "
                        f"(as made by cell.initial_carry(batch_shape={batch_shape})).")
    for got, want in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(expected)):
        if jnp.shape(got) != want.shape:
            raise ValueError(f"carry has a leaf of shape {jnp.shape(got)}; expected {want.shape} for inputs with "
                             f"batch shape {batch_shape} (as made by cell.initial_carry(batch_shape={batch_shape})).")


def _carry_as_the_step_returns(cell, params, xs: jax.Array, carry, given: bool):
    """``carry`` in the dtypes one step returns it: with parameters and inputs of different float dtypes (float32
    weights on bfloat16 inputs, say) a step promotes, and `jax.lax.scan` refuses a carry whose type changes. The
    default carry takes the step's dtypes; a carry of the caller's must already have them (`TypeError` otherwise).
    One float dtype throughout: nothing to check (no trace)."""
    floats = [leaf for leaf in jax.tree_util.tree_leaves((params, xs, carry))
              if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
    if len({jnp.result_type(leaf) for leaf in floats}) <= 1:
        return carry
    step_dtypes = lambda c: [leaf.dtype for leaf in jax.tree_util.tree_leaves(  # noqa: E731
        jax.eval_shape(lambda c: cell(params, c, xs[0])[0], c))]
    dtypes = [jnp.result_type(leaf) for leaf in jax.tree_util.tree_leaves(carry)]
    returned = step_dtypes(carry)
    if returned == dtypes:
        return carry
    names = lambda dtypes: [str(dtype) for dtype in dtypes]  # noqa: E731
    if given:
        raise TypeError(f"carry has dtypes {names(dtypes)}, but one step of {type(cell).__name__} with these params "
                        f"({names({jnp.result_type(leaf) for leaf in jax.tree_util.tree_leaves(params)})}) and xs "
                        f"({xs.dtype}) returns {names(returned)}: pass a carry of those dtypes, or params and xs of "
                        "one dtype.")
    promoted = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(carry), [
        jnp.asarray(leaf, dtype) for leaf, dtype in zip(jax.tree_util.tree_leaves(carry), returned)])
    if step_dtypes(promoted) != returned:
        raise TypeError(f"one step of {type(cell).__name__} changes its carry's dtypes whatever they start as "
                        f"({names(dtypes)} -> {names(returned)} -> {names(step_dtypes(promoted))}); "
                        "jax.lax.scan needs a fixed carry type.")
    return promoted


def in_one_dtype(cell, params, xs: jax.Array, carry):
    """``params`` and ``xs`` cast to the dtype JAX promotes them to, where their float dtypes differ, the carry
    (`_carry_as_the_step_returns`) has that dtype too, and the cast lets the fused recurrence run the cell
    (`fused.supports`: a built-in cell with a named activation): its step computes in that dtype anyway, and the
    native kernels then run it. Gradients come back in each argument's own dtype through the casts. Otherwise (a
    caller's float32 carry for a bfloat16 cell, a user's cell) the plain step keeps its own promotions."""
    leaves = [leaf for leaf in jax.tree_util.tree_leaves((params, xs)) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    dtype = jnp.result_type(*leaves)
    if (all(leaf.dtype == dtype for leaf in leaves)
            or any(jnp.result_type(leaf) != dtype for leaf in jax.tree_util.tree_leaves(carry))):
        return params, xs
    cast = lambda leaf: leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf  # noqa: E731
    one_params, one_xs = jax.tree_util.tree_map(cast, params), cast(xs)
    return (one_params, one_xs) if fused.supports(cell, one_params, carry, one_xs) else (params, xs)


def _valid(seq_len: int, lengths: jax.Array | None) -> jax.Array | None:
    """``valid [T, *batch]``: whether step t of each sequence lies within its length (None without lengths)."""
    return None if lengths is None else jnp.arange(seq_len).reshape((-1,) + (1,) * lengths.ndim) < lengths


def _check_lengths(lengths, batch_shape, seq_len) -> jax.Array:
    lengths = jnp.asarray(lengths)
    if lengths.shape != tuple(batch_shape):
        raise ValueError(f"lengths has shape {lengths.shape}; expected the batch shape of xs, {tuple(batch_shape)}.")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}.")
    if not isinstance(lengths, jax.core.Tracer):
        values = np.asarray(lengths)
        if values.size and (values.min() < 1 or values.max() > seq_len):
            raise ValueError(f"lengths must lie in [1, T] = [1, {seq_len}]; got values from {values.min()} "
                             f"to {values.max()}.")
    return lengths


def remat_near_sqrt(seq_len: int) -> int:
    """The divisor of ``seq_len`` nearest ``√seq_len``: a ``remat`` chunk length for `scan` (and
    `rnnlab.gradflow.grad_norms`, `rnnlab.models`) that keeps memory near its least, ``T / remat + remat``."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}.")
    return min((k for k in range(1, seq_len + 1) if seq_len % k == 0), key=lambda k: abs(k - math.sqrt(seq_len)))


def _remat_scan(run_steps, carry, inputs, *, chunk: int, reverse: bool):
    """``run_steps(carry, inputs) -> (carry, ys)`` over chunks of ``chunk`` steps of ``inputs`` (``None`` leaves stay
    ``None``), storing only the carry at chunk boundaries; each chunk is recomputed on the way back.

    Peak memory for the backward pass is O(T / chunk + chunk) steps instead of O(T); ``chunk ≈ √T`` minimises it.
    ``T`` must be a multiple of ``chunk``.
    """
    seq_len = jax.tree_util.tree_leaves(inputs)[0].shape[0]
    if seq_len % chunk:
        raise ValueError(f"remat={chunk} must divide the sequence length T={seq_len}.")
    chunked = jax.tree_util.tree_map(lambda a: a.reshape((seq_len // chunk, chunk) + a.shape[1:]), inputs)
    carry, ys = jax.lax.scan(jax.checkpoint(run_steps), carry, chunked, reverse=reverse)
    return carry, jax.tree_util.tree_map(lambda a: a.reshape((seq_len,) + a.shape[2:]), ys)


def _split_like_inputs(carry, xs: jax.Array):
    """``carry`` with its batch axes split over devices as ``xs [T, *batch, input_size]``'s are, where ``xs``'s type
    says so (`jax.sharding`'s explicit mode; elsewhere types carry no split and this does nothing). Explicit mode
    types a loop's carry: a carry of zeros, replicated, against steps that return it split would not scan."""
    batch_spec = tuple(jax.typeof(xs).sharding.spec[1:xs.ndim - 1])
    if not any(batch_spec):
        return carry
    batch_shape = xs.shape[1:-1]

    def split(leaf):  # a leaf without the batch axes in front (a step count, say) is left as it is
        if jnp.shape(leaf)[:len(batch_shape)] != batch_shape:
            return leaf
        return jax.sharding.reshard(leaf, PartitionSpec(*batch_spec, *(None,) * (jnp.ndim(leaf) - len(batch_spec))))

    return jax.tree_util.tree_map(split, carry)


def prepare(cell, params, xs: jax.Array, carry: Any = None, time_axis: int = 0):
    """Check ``xs`` and ``carry`` against ``cell`` and ``params``; return ``(xs_time_major, carry, time_axis)``.

    Raises `TypeError` / `ValueError` naming the argument and the shapes involved: non-float ``xs``, fewer than two
    axes, ``T = 0``, an input size other than the parameters', a carry of the wrong structure or shape, or (with
    params and xs of different float dtypes) of other dtypes than one step returns. ``carry`` defaults to
    ``cell.initial_carry(batch_shape)`` in the dtypes one step returns; the returned ``time_axis`` is non-negative.
    """
    xs = jnp.asarray(xs)
    check_float_input("xs", xs)
    if xs.ndim < 2:
        raise ValueError(f"xs has shape {xs.shape}; expected [T, *batch, input_size] (at least 2 axes).")
    axis = time_axis + xs.ndim if time_axis < 0 else time_axis
    if not 0 <= axis < xs.ndim - 1:
        raise ValueError(f"time_axis={time_axis} is not a time axis of xs with shape {xs.shape}; the last axis "
                         "holds the input features.")
    xs = jnp.moveaxis(xs, axis, 0)
    seq_len, batch_shape = xs.shape[0], xs.shape[1:-1]
    if seq_len == 0:
        raise ValueError(f"xs has shape {xs.shape} (time first): the sequence length T must be at least 1.")
    if hasattr(cell, "input_size"):
        check_input_size("xs", xs, cell.input_size(params))
    if carry is None:
        carry = _carry_as_the_step_returns(cell, params, xs, cell.initial_carry(batch_shape, xs.dtype), False)
    else:
        _check_carry(cell, carry, batch_shape, xs.dtype)
        carry = _carry_as_the_step_returns(cell, params, xs, carry, True)
    return xs, _split_like_inputs(carry, xs), axis


def step_and_inputs(cell, params, xs: jax.Array, *, hoist: bool = True):
    """``(step, inputs)`` with ``step(carry, inputs[t]) -> (carry, y)`` equal to ``cell(params, carry, xs[t])``.

    When ``hoist`` and the cell defines ``project_inputs`` the input matmul is done here for all steps at once and
    ``step`` is ``cell.recur``; otherwise ``inputs`` is ``xs`` and ``step`` the plain cell step. Rematerialised loops
    pass ``hoist=False``: a ``[T, *batch, G·H]`` projection (and its cotangent) would undo what they save.
    """
    if hoist and hasattr(cell, "project_inputs"):
        projected = fused.over_steps(lambda x: cell.project_inputs(params, x), xs)
        return (lambda carry, x: cell.recur(params, carry, x)), projected
    return (lambda carry, x: cell(params, carry, x)), xs


def scan(
    cell,
    params,
    xs: jax.Array,
    *,
    carry: Any = None,
    lengths: jax.Array | None = None,
    reverse: bool = False,
    time_axis: int = 0,
    unroll: int = 1,
    remat: int | None = None,
):
    """Run ``cell`` over the time axis of ``xs``.

    **Arguments:**

    - ``cell``, ``params``: any object following the cell protocol (`rnnlab.cells`) and its parameters.
    - ``xs``: ``[T, *batch, input_size]`` (time at ``time_axis``; any number of batch axes, including none).
    - ``carry``: the initial carry; ``cell.initial_carry(batch_shape)`` (zeros) by default, in the dtypes one step
      returns (float32 for float32 weights on bfloat16 inputs: JAX's promotion); one of the caller's must have those
      dtypes. A built-in cell then runs params and xs cast to that dtype, as its step would compute anyway, so its
      kernels apply.
    - ``lengths``: ``[*batch]`` integers in ``[1, T]``, the valid length of each sequence. The final carry is each
      sequence's carry after its own last valid step, and outputs at padded steps are exactly zero.
    - ``reverse``: run each sequence from its last valid step back to its first; outputs stay aligned with inputs
      (``ys[t]`` is the output after consuming ``xs[t]``).
    - ``unroll``: passed to `jax.lax.scan`. With the default 1, the built-in cells' loops run on a GPU
      ``$RNNLAB_GPU_UNROLL`` (8) steps per loop iteration all the same (`rnnlab.native`); the numbers do not change.
    - ``remat``: a chunk length dividing ``T``; only carries at chunk boundaries are kept for the backward pass and
      each chunk is recomputed (`jax.checkpoint`), so memory grows as ``T / remat + remat`` instead of ``T``,
      besides ``ys`` (``T`` outputs, and their cotangent when a loss reads them; a loss on the final carry reads
      none, as `rnnlab.models.ManyToOne` with ``remat`` does).

    **Returns:** ``(ys, final_carry)`` with ``ys [T, *batch, output_size]`` (time at ``time_axis``).

    When the cell defines ``project_inputs`` (and ``recur``), the input matmul runs once for all steps before the
    loop; the numbers are those of the plain step. The built-in cells run a fused recurrence with a hand-written
    tangent rule whose weight gradients are one matmul over all steps (`rnnlab.fused`; on a CPU the native kernels,
    with ``lengths`` their masked twins); the results equal those of the plain step to rounding. On the native
    kernels the LSTM's and the GRU's forward kernels project each step's input in their loop instead (with
    ``lengths`` the valid steps' alone; the tangent's projection stays one matmul), and an LSTM that nothing
    differentiates runs its forward pass alone, keeping nothing for a backward pass
    (`rnnlab.fused.recurrence_of_inputs`). With ``remat`` each chunk runs so on its own inputs (so only a chunk's
    projection is ever formed), recomputed on the way back.

    In `jax.sharding`'s explicit mode, where ``xs``'s type splits its batch axes over devices, the default carry is
    split alike (a given one is resharded so), and the built-in cells' kernels run on each device's rows
    (`rnnlab.native.bind`): ``ys`` and the final carry come out split the same way.
    """
    xs, carry, axis = prepare(cell, params, xs, carry, time_axis)
    params, xs = in_one_dtype(cell, params, xs, carry)
    seq_len, batch_shape = xs.shape[0], xs.shape[1:-1]
    if lengths is not None:
        lengths = _check_lengths(lengths, batch_shape, seq_len)
        if reverse:
            # Reverse inside each valid span, then run forward: padded steps stay at the end of every sequence.
            xs = reverse_padded(xs, lengths)
    scan_reverse = reverse and lengths is None
    if fused.supports(cell, params, carry, xs):
        steps = (xs, _valid(seq_len, lengths))

        def run_steps(carry, steps):  # with remat, a chunk's raw inputs: only its own projection is ever formed
            steps_xs, steps_valid = steps
            return fused.recurrence_of_inputs(cell, params, carry, steps_xs, valid=steps_valid, reverse=scan_reverse,
                                              unroll=unroll)
    else:
        step, inputs = step_and_inputs(cell, params, xs, hoist=remat is None)
        if lengths is None:
            body, steps = step, inputs
        else:
            def body(carry, t_and_x):
                t, x = t_and_x
                new_carry, y = step(carry, x)
                valid = t < lengths
                new_carry = jax.tree_util.tree_map(
                    lambda new, old: jnp.where(_broadcast_to_leaf(valid, new), new, old), new_carry, carry
                )
                return new_carry, jnp.where(_broadcast_to_leaf(valid, y), y, jnp.zeros_like(y))

            steps = (jnp.arange(seq_len), inputs)

        def run_steps(carry, steps):
            return jax.lax.scan(body, carry, steps, reverse=scan_reverse, unroll=unroll)

    if remat is None:
        carry, ys = run_steps(carry, steps)
    else:
        carry, ys = _remat_scan(run_steps, carry, steps, chunk=remat, reverse=scan_reverse)
    if lengths is not None and reverse:
        ys = reverse_padded(ys, lengths)
    return jnp.moveaxis(ys, 0, axis), carry
