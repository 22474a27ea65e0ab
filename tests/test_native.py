"""The native kernels (`rnnlab.native`, C++ through XLA's FFI) against plain autodiff of each cell's step.

`rnnlab.scan` sends the LSTM, the GRU and the Elman RNN (float32; a hidden size off the kernels' multiple of 16
padded with units that stay zero) to the kernels on CPU, their masked twins when sequences are padded
(``lengths``); the reference is the same cell as a subclass instance, which `scan` runs as a plain `lax.scan`
differentiated by JAX, and the truth is that reference in float64. Each case also checks that the compiled program
really calls the kernel, so a silent fallback cannot pass for it.
"""

import dataclasses
import functools
import itertools
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pallas_lowering
import pytest
from test_fused import assert_trees_close, plain_twin

import rnnlab
from rnnlab import fused, models, native
from rnnlab.native import pallas

ROOT = pathlib.Path(__file__).resolve().parents[1]
INPUT_SIZE = 3

needs_kernels = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                   reason="no C++ compiler: the kernels cannot be built here")


def make_cell(kind: str, hidden: int):
    """``LSTM``, ``GRU`` or ``RNN-<activation>``."""
    if kind.startswith("RNN-"):
        return rnnlab.RNN(hidden_size=hidden, activation=kind.removeprefix("RNN-"))
    return getattr(rnnlab, kind)(hidden_size=hidden)


def problem(hidden, batch_shape, seq_len, seed=0, kind="LSTM"):
    """A cell, its initial parameters each moved by N(0, 0.3²) noise, inputs, a carry and the loss's weights.

    An Elman RNN's recurrent weights are moved by N(0, 1/H) instead: with 0.3 per element its recurrence has gain
    0.3·√H (3.4 at hidden 128), which is chaotic — float32 rounding grew to 0.15 of the outputs' scale in 30 steps,
    in XLA's own run as much as the kernels', so a comparison with the float64 truth could tell nothing. At gain
    ≈ √2 XLA's largest float32 error stays below 3e-6 at every shape here, and the kernels' within 1.8x of it (seeds
    0-5, both directions; the tanh RNN at hidden 128 had been held only to 3x XLA's 0.15)."""
    cell = make_cell(kind, hidden)
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    params = cell.init(keys[0], INPUT_SIZE)
    params = jax.tree_util.tree_map(lambda p: p + 0.3 * jax.random.normal(keys[1], p.shape), params)
    if isinstance(cell, rnnlab.RNN):
        w_h = cell.init(keys[0], INPUT_SIZE)["w_h"]
        params["w_h"] = w_h + jax.random.normal(keys[1], w_h.shape) / math.sqrt(hidden)
    xs = jax.random.normal(keys[2], (seq_len, *batch_shape, INPUT_SIZE))
    carry = jax.tree_util.tree_map(lambda c: 0.5 * jax.random.normal(keys[3], c.shape),
                                   cell.initial_carry(batch_shape))
    weights = jax.random.normal(keys[4], (seq_len, *batch_shape, hidden))
    return cell, params, xs, carry, weights


def loss_fn(the_cell, weights, reverse, lengths=None):
    def loss(params, xs, carry):
        ys, final = rnnlab.scan(the_cell, params, xs, carry=carry, reverse=reverse, lengths=lengths)
        # Every leaf of the final carry in the loss, each with its own weight.
        carry_terms = sum(jnp.sum(jnp.cos((i + 1) * leaf)) for i, leaf in enumerate(jax.tree_util.tree_leaves(final)))
        return jnp.sum(weights * jnp.sin(ys)) + carry_terms

    return loss


def calls_kernel(fn, *args, masked=False) -> bool:
    """Whether ``fn`` lowers to a cell's forward kernel, masked or not as asked (the LSTM's and the GRU's project
    their inputs, `native.lstm_forward_inputs_p`, `native.gru_forward_inputs_p`; for an LSTM evaluated without
    differentiation, its forward pass alone: `native.lstm_infer_p`)."""
    text = jax.jit(fn).lower(*args).as_text()
    kernels = re.findall(r"rnnlab_(?:lstm|gru|rnn)_(?:forward|infer)\w*", text)
    return any(kernel.endswith("_masked") == masked for kernel in kernels)


def assert_near_float64_truth(cell, weights, reverse, params, xs, carry, lengths=None):
    """The outputs and final carry of `rnnlab.scan`, a loss on both, and its gradient, from ``cell`` (the kernels)
    against plain autodiff of its step in float64. Float32 rounding grows along the recurrence (at 30 steps with
    these weights, to ~1e-5 relative) and two float32 runs summing in different orders land anywhere in that spread,
    so the kernels are held to within 10x XLA's own float32 error (at least 1e-6); a wrong term would be off by
    orders of magnitude more. The recurrences of `problem` are not chaotic, so that spread stays small (XLA's
    largest error 1.8e-5, the LSTM at hidden 128)."""

    def results(the_cell, weights, params, xs, carry):
        outputs = rnnlab.scan(the_cell, params, xs, carry=carry, reverse=reverse, lengths=lengths)
        loss = loss_fn(the_cell, weights, reverse, lengths)
        return outputs, jax.value_and_grad(loss, argnums=(0, 1, 2))(params, xs, carry)

    got = jax.jit(lambda: results(cell, weights, params, xs, carry))()
    plain = jax.jit(lambda: results(plain_twin(cell), weights, params, xs, carry))()
    with jax.enable_x64(True):
        as64 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
        truth = jax.jit(lambda: results(plain_twin(cell), *as64((weights, params, xs, carry))))()
        errors = []  # (the kernels', XLA's) largest error of each leaf, relative to the leaf's largest element
        for got_leaf, plain_leaf, true_leaf in zip(*map(jax.tree_util.tree_leaves, (got, plain, truth)), strict=True):
            scale = np.max(np.abs(true_leaf)) + 1e-30
            errors.append((np.max(np.abs(np.asarray(got_leaf, np.float64) - true_leaf)) / scale,
                           np.max(np.abs(np.asarray(plain_leaf, np.float64) - true_leaf)) / scale))
        for got_error, plain_error in errors:
            assert got_error <= max(10 * plain_error, 1e-6), (got_error, plain_error)


@needs_kernels
def test_kernels_build_and_load():
    assert native.available()


SHAPES = {
    "h16": (16, (5,), 7),  # one chunk of units: one thread
    "h32": (32, (9,), 7),  # two chunks, batch rows in blocks of 8 + 1
    "h48-one-step": (48, (3, 2), 1),  # three chunks on two threads (uneven), two batch axes, one step
    # 40 rows: the kernels form W_h's gradient themselves, in sums of 12, 12 and 6 steps; hidden 128 (the
    # benchmark's) and 64 leave 2 and 4 rows of it past AVX2's blocks of 6 rows. 60 units run padded to 64, with
    # units that must stay zero through 30 steps.
    "h128-b40": (128, (40,), 30),
    "h60-b40": (60, (40,), 30),
}
CASES = [(kind, *shape) for kind in ("LSTM", "GRU", "RNN-tanh") for shape in SHAPES.values()]
CASES += [(kind, *SHAPES["h32"]) for kind in ("RNN-relu", "RNN-linear")]
CASE_IDS = [f"{kind}-{name}" for kind in ("LSTM", "GRU", "RNN-tanh") for name in SHAPES]
CASE_IDS += [f"{kind}-h32" for kind in ("RNN-relu", "RNN-linear")]
# Every case in both directions (each compiles four programs: 2-6 s on the 2-core CPU in `make test`'s quick-compile
# mode, conftest.py).
DIRECTED_CASES = [
    pytest.param(*case, reverse, id=f"{'reverse' if reverse else 'forward'}-{case_id}")
    for case, case_id in zip(CASES, CASE_IDS) for reverse in (False, True)
]


@needs_kernels
@pytest.mark.parametrize("kind,hidden,batch_shape,seq_len,reverse", DIRECTED_CASES)
def test_kernels_equal_autodiff_of_the_step(kind, hidden, batch_shape, seq_len, reverse, monkeypatch):
    # Every cell's kernel sum of W_h's gradient runs here on every CPU, also where XLA forms the LSTM's by default.
    monkeypatch.setattr(native, "XLA_WEIGHT_GRAD_WITHOUT_AVX512", frozenset())
    cell, params, xs, carry, weights = problem(hidden, batch_shape, seq_len, kind=kind)
    native_loss, plain_loss = loss_fn(cell, weights, reverse), loss_fn(plain_twin(cell), weights, reverse)
    assert calls_kernel(jax.grad(native_loss, argnums=(0, 1, 2)), params, xs, carry)
    assert not calls_kernel(plain_loss, params, xs, carry)
    # W_h's gradient: summed in the backward kernel from MIN_ROWS_FOR_WEIGHT_GRAD rows, else one XLA matmul after it.
    lowered = jax.jit(jax.grad(native_loss, argnums=(0, 1, 2))).lower(params, xs, carry).as_text()
    in_kernel = math.prod(batch_shape) >= native.MIN_ROWS_FOR_WEIGHT_GRAD
    assert f"weight_grad = {str(in_kernel).lower()}" in lowered
    assert_near_float64_truth(cell, weights, reverse, params, xs, carry)


# (kind, rows, hidden, steps, padded, reverse, split): with 3 threads, 40 rows in 3 groups (the kernels sum W_h's
# gradient per group) and 19 in 2 (XLA forms it); 12 rows, and 40 rows of too little work a group (2 steps), on a
# team that splits the units (W_h's gradient summed in the kernel for the 40); the LSTM's 12 rows unpadded also
# give the forward pass alone (`lstm_infer_p`) on a team.
THREAD_CASES = [("LSTM", 40, 64, 120, False, False, (3, True)), ("GRU", 19, 64, 120, True, True, (2, True)),
                ("RNN-tanh", 40, 64, 120, True, False, (3, True)), ("GRU", 40, 64, 120, False, True, (3, True)),
                ("LSTM", 19, 64, 120, True, False, (2, True)), ("LSTM", 12, 128, 30, True, False, (3, False)),
                ("GRU", 40, 128, 2, False, True, (3, False)), ("LSTM", 12, 128, 30, False, True, (3, False))]


@needs_kernels
@pytest.mark.parametrize("kind,rows,hidden,steps,padded,reverse,split", [
    pytest.param(*case, id=f"{case[0]}-b{case[1]}-h{case[2]}-t{case[3]}{'-padded' if case[4] else ''}"
                           f"{'-reverse' if case[5] else ''}") for case in THREAD_CASES])
def test_groups_of_rows_and_teams_give_one_threads_numbers(kind, rows, hidden, steps, padded, reverse, split,
                                                           monkeypatch):
    """From 8 rows a thread (and enough work a group) the cell kernels run each group of rows whole on one thread,
    else a team of threads splits the units (`native.cell_split`); with 3 threads asked for, XLA's pool of 2 runs
    them. Every output and gradient is then bit for bit one thread's (each row's units are computed in the same
    order), but W_h's gradient (and the GRU's b_h's, summed with it) where groups of rows sum it in the kernel (from
    `native.MIN_ROWS_FOR_WEIGHT_GRAD` rows: per group, the groups added at the end), which is within float32
    rounding of it; and all near the float64 truth."""
    monkeypatch.setattr(native, "XLA_WEIGHT_GRAD_WITHOUT_AVX512", frozenset())
    cell, params, xs, carry, weights = problem(hidden, (rows,), steps, kind=kind)
    lengths = jax.random.randint(jax.random.PRNGKey(7), (rows,), 1, steps + 1).at[0].set(steps) if padded else None

    def run(threads):
        monkeypatch.setenv("RNNLAB_NATIVE_THREADS", threads)
        outputs = jax.jit(lambda p, x, c: rnnlab.scan(cell, p, x, carry=c, reverse=reverse, lengths=lengths))
        loss = loss_fn(cell, weights, reverse, lengths)
        assert calls_kernel(loss, params, xs, carry, masked=padded)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return outputs(params, xs, carry), grad(params, xs, carry), native.cell_split(cell, steps, rows)

    (outputs, grads, got_split), (outputs_one, grads_one, split_one) = run("3"), run("1")
    assert got_split == split and split_one == (1, False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, outputs, outputs_one)
    sums = [(grads[0].pop(name), grads_one[0].pop(name)) for name in ["w_h"] + (["b_h"] if kind == "GRU" else [])]
    jax.tree_util.tree_map(np.testing.assert_array_equal, grads, grads_one)
    for got, one in sums:
        if split[1] and rows >= native.MIN_ROWS_FOR_WEIGHT_GRAD:
            np.testing.assert_allclose(got, one, rtol=1e-5, atol=1e-6 * np.max(np.abs(one)))
        else:
            np.testing.assert_array_equal(got, one)
    monkeypatch.setenv("RNNLAB_NATIVE_THREADS", "3")
    assert_near_float64_truth(cell, weights, reverse, params, xs, carry, lengths)


# (kind, rows, reverse): rows 9 leave W_h's gradient to XLA, 40 have the kernels sum it (the LSTM's too, here).
MASKED_CASES = [("LSTM", 9, False), ("LSTM", 40, True), ("GRU", 9, True), ("RNN-relu", 9, False),
                ("RNN-tanh", 40, True), ("GRU", 40, False), ("RNN-linear", 40, False)]


@needs_kernels
@pytest.mark.parametrize("kind,rows,reverse", [
    pytest.param(*case, id=f"{case[0]}-b{case[1]}-{'reverse' if case[2] else 'forward'}") for case in MASKED_CASES])
def test_padded_sequences_run_the_masked_kernels(kind, rows, reverse, monkeypatch):
    """With ``lengths`` the masked kernels run: a padded step keeps its row's carry, and its cotangent passes back
    unchanged. Outputs, final carry and gradients against plain autodiff of the masked step (float64 truth); the
    first case (20 units, run padded to 32) also a forward-mode derivative, and `models.ManyToOne` with lengths
    reaching them."""
    monkeypatch.setattr(native, "XLA_WEIGHT_GRAD_WITHOUT_AVX512", frozenset())
    first = (kind, rows, reverse) == MASKED_CASES[0]
    hidden = 20 if first else 32
    cell, params, xs, carry, weights = problem(hidden, (rows,), 11, kind=kind)
    lengths = jax.random.randint(jax.random.PRNGKey(7), (rows,), 1, 12).at[0].set(11).at[1].set(1)
    native_loss = loss_fn(cell, weights, reverse, lengths)
    grad = jax.grad(native_loss, argnums=(0, 1, 2))
    lowered = jax.jit(grad).lower(params, xs, carry).as_text()
    name = kind.split("-")[0].lower()
    # The LSTM's and the GRU's forward kernels project the valid rows' inputs themselves; the LSTM's outputs alone
    # (nothing differentiated, as `assert_near_float64_truth` also takes them) run its masked forward pass alone.
    forward = f"rnnlab_{name}_forward{'' if name == 'rnn' else '_inputs'}_masked"
    assert forward in lowered and f"rnnlab_{name}_backward_masked" in lowered
    outputs = jax.jit(lambda p, x, c: rnnlab.scan(cell, p, x, carry=c, reverse=reverse, lengths=lengths))
    assert (name == "lstm") == ("rnnlab_lstm_infer_masked" in outputs.lower(params, xs, carry).as_text())
    assert_near_float64_truth(cell, weights, reverse, params, xs, carry, lengths)
    if not first:
        return
    tangents = jax.tree_util.tree_map(jnp.cos, (params, xs, carry))
    jvp = lambda loss: jax.jvp(loss, (params, xs, carry), tangents)[1]  # noqa: E731
    np.testing.assert_allclose(jax.jit(lambda: jvp(native_loss))(),
                               jax.jit(lambda: jvp(loss_fn(plain_twin(cell), weights, reverse, lengths)))(),
                               rtol=1e-4)
    model = models.ManyToOne(cell, 1)
    model_params = {"cell": params, "readout": models.dense_init(jax.random.PRNGKey(0), hidden, 1)}
    assert calls_kernel(jax.grad(lambda p, xs: jnp.sum(model(p, xs, lengths=lengths))), model_params, xs,
                        masked=True)


@needs_kernels
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-tanh"])
def test_remat_runs_the_kernels_chunk_by_chunk(kind):
    """With ``remat`` each chunk projects its inputs and runs the kernels, recomputed on the way back: the values and
    gradients of the unchunked kernels (a loss on the outputs and the final carry; in reverse for the GRU)."""
    cell, params, xs, carry, weights = problem(32, (9,), 12, kind=kind)

    def value_and_grad(remat):
        def loss(params, xs, carry):
            ys, final = rnnlab.scan(cell, params, xs, carry=carry, reverse=kind == "GRU", remat=remat)
            return jnp.sum(weights * jnp.sin(ys)) + sum(jnp.sum(jnp.cos(leaf)) for leaf in jax.tree.leaves(final))

        assert calls_kernel(jax.grad(loss, argnums=(0, 1, 2)), params, xs, carry)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, xs, carry)

    for got, want in zip(jax.tree.leaves(value_and_grad(4)), jax.tree.leaves(value_and_grad(None)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))
    # and so does `models.ManyToOne` with remat, reading its last output from the final carry
    model = models.ManyToOne(cell, 1, remat=4)
    model_params = {"cell": params, "readout": models.dense_init(jax.random.PRNGKey(0), 32, 1)}
    assert calls_kernel(jax.grad(lambda p, xs: jnp.sum(model(p, xs))), model_params, xs)


@needs_kernels
@pytest.mark.parametrize("kind,rows,reverse", [("GRU", 40, True), ("LSTM", 9, False)])
def test_a_primitive_bound_off_the_kernels_multiple_is_padded_where_lowered(kind, rows, reverse, monkeypatch):
    """`fused` pads a cell's recurrence itself (`native.padded_hidden`); with that off, its primitives are bound at
    20 units, as the gradient-flow primitive is, and each is padded in its CPU lowering and its results cut back
    (`native._padded_call`). Padded sequences, W_h's gradient formed in the kernel (40 rows) and by XLA (9):
    outputs, final carry and gradients against the float64 truth, and a forward-mode derivative."""
    monkeypatch.setattr(native, "XLA_WEIGHT_GRAD_WITHOUT_AVX512", frozenset())
    monkeypatch.setattr(native, "padded_hidden", lambda hidden, dtype: hidden)
    cell, params, xs, carry, weights = problem(20, (rows,), 9, kind=kind)
    lengths = jax.random.randint(jax.random.PRNGKey(7), (rows,), 1, 10).at[0].set(9)
    native_loss = loss_fn(cell, weights, reverse, lengths)
    lowered = jax.jit(jax.grad(native_loss, argnums=(0, 1, 2))).lower(params, xs, carry).as_text()
    name = kind.lower()
    assert f"rnnlab_{name}_forward_inputs_masked" in lowered and f"rnnlab_{name}_backward_masked" in lowered
    assert_near_float64_truth(cell, weights, reverse, params, xs, carry, lengths)
    tangents = jax.tree_util.tree_map(jnp.cos, (params, xs, carry))
    jvp = lambda loss: jax.jvp(loss, (params, xs, carry), tangents)[1]  # noqa: E731
    np.testing.assert_allclose(jax.jit(lambda: jvp(native_loss))(),
                               jax.jit(lambda: jvp(loss_fn(plain_twin(cell), weights, reverse, lengths)))(),
                               rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-relu"])
def test_masked_kernels_take_any_mask_in_either_direction(kind):
    """`fused.recurrence` with any ``valid`` mask (not only the prefixes that `scan`'s lengths make), in reverse
    time: the masked kernels' outputs, final carry and gradients against `jax.lax.scan` of the cell's own step with
    the carry kept at invalid steps, differentiated by JAX."""
    cell, params, xs, carry, weights = problem(32, (40,), 9, kind=kind)
    projected = cell.project_inputs(params, xs)
    valid = jax.random.bernoulli(jax.random.PRNGKey(3), 0.6, (9, 40))

    def reference(params, carry, projected):
        def body(old, inputs):
            px_t, valid_t = inputs
            new, y = cell.recur(params, old, px_t)
            new = jax.tree_util.tree_map(lambda a, b: jnp.where(valid_t[:, None], a, b), new, old)
            return new, jnp.where(valid_t[:, None], y, 0.0)

        return jax.lax.scan(body, carry, (projected, valid), reverse=True)

    def kernels(params, carry, projected):
        return fused.recurrence(cell, params, carry, projected, valid=valid, reverse=True)

    def loss(run):
        def value(params, carry, projected):
            final, hs = run(params, carry, projected)
            return jnp.sum(weights * jnp.sin(hs)) + sum(jnp.sum(jnp.cos(leaf)) for leaf in jax.tree.leaves(final))

        return jax.value_and_grad(value, argnums=(0, 1, 2))

    assert calls_kernel(loss(kernels), params, carry, projected, masked=True)
    assert_trees_close(jax.jit(loss(kernels))(params, carry, projected),
                       jax.jit(loss(reference))(params, carry, projected), rtol=1e-5, atol=1e-5, scaled=True)


@needs_kernels
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-tanh", "RNN-relu"])
def test_a_nan_in_the_inputs_reaches_the_outputs_as_in_xla(kind):
    """A nan in a sequence's inputs (a data bug, or an overflow's inf · 0) makes that sequence's outputs nan from its
    step on, and the gradients nan, as JAX's plain scan has it: the kernels' exp, tanh, sigmoid and ReLU pass a nan
    on instead of clamping it to a finite number. The other sequences are untouched. (20 units, run padded to 32:
    the added units of that sequence turn nan too, and stay in their row.)"""
    cell, params, xs, carry, weights = problem(20, (3,), 6, kind=kind)
    xs = xs.at[2, 1, 0].set(jnp.nan)

    def run(the_cell):
        def outputs(params, xs):
            return rnnlab.scan(the_cell, params, xs, carry=carry)[0]

        return jax.jit(lambda p, x: (outputs(p, x), jax.grad(lambda p: jnp.sum(outputs(p, x)))(p)))(params, xs)

    assert calls_kernel(lambda p, x: rnnlab.scan(cell, p, x, carry=carry)[0], params, xs)
    (hs, grads), (want, want_grads) = run(cell), run(plain_twin(cell))
    np.testing.assert_array_equal(np.isnan(hs), np.isnan(want))
    assert np.all(np.isnan(hs[2:, 1])) and not np.any(np.isnan(hs[:2])) and not np.any(np.isnan(hs[:, [0, 2]]))
    for leaf, want_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_array_equal(np.isnan(leaf), np.isnan(want_leaf))


@needs_kernels
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_the_forward_kernels_project_their_inputs(kind, reverse):
    """The LSTM's and the GRU's forward kernels project each step's input in their loop: an LSTM that nothing
    differentiates runs `native.lstm_infer_p` (no gates kept), differentiated `native.lstm_forward_inputs_p`; the
    GRU `native.gru_forward_inputs_p` either way; with ``lengths`` their masked twins, which project the valid rows'
    inputs alone; with ``remat`` the same, chunk by chunk. All give the plain step's outputs and final carry to
    float32 rounding (`test_kernels_equal_autodiff_of_the_step` holds them and the gradients to the float64 truth,
    padded too), and the primal of a `jax.jvp` is the differentiated path's."""
    cell, params, xs, carry, weights = problem(48, (6,), 12, kind=kind)
    name = kind.lower()

    def run(params, xs, **options):
        return rnnlab.scan(cell, params, xs, carry=carry, reverse=reverse, **options)

    def kernels(fn, *args):
        text = jax.jit(fn).lower(*args).as_text()
        return sorted(set(re.findall(rf"rnnlab_{name}_((?:infer|forward)(?:_inputs)?(?:_masked)?)\b", text)))

    loss = loss_fn(cell, weights, reverse)
    lengths = jnp.array([12, 3, 7, 12, 1, 9])
    assert kernels(run, params, xs) == (["infer"] if kind == "LSTM" else ["forward_inputs"])
    assert kernels(jax.grad(loss), params, xs, carry) == ["forward_inputs"]
    assert kernels(lambda p, x: jax.jvp(lambda p: run(p, x), (p,), (p,)), params, xs) == ["forward_inputs"]
    padded = functools.partial(run, lengths=lengths)
    assert kernels(padded, params, xs) == (["infer_masked"] if kind == "LSTM" else ["forward_inputs_masked"])
    assert kernels(jax.grad(loss_fn(cell, weights, reverse, lengths)), params, xs, carry) == ["forward_inputs_masked"]
    chunked = functools.partial(run, remat=4)
    assert kernels(chunked, params, xs) == (["infer"] if kind == "LSTM" else ["forward_inputs"])
    assert kernels(jax.grad(lambda p, x: jnp.sum(weights * chunked(p, x)[0])), params, xs) == ["forward_inputs"]
    for options in ({}, {"lengths": lengths}, {"remat": 4}):
        alone = jax.jit(functools.partial(run, **options))(params, xs)
        differentiated = jax.jit(lambda p, x: jax.jvp(lambda p: run(p, x, **options), (p,), (p,))[0])(params, xs)
        plain = jax.jit(lambda p, x: rnnlab.scan(plain_twin(cell), p, x, carry=carry, reverse=reverse, **options))(
            params, xs)
        assert_trees_close(alone, differentiated, rtol=1e-5, atol=1e-6)
        assert_trees_close(alone, plain, rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-tanh"])
def test_an_empty_batch_at_a_padded_hidden_size(kind):
    """No sequences (a batch axis of 0) at a hidden size the kernels run padded: outputs of shape [T, 0, H] and a
    zero gradient, as the plain scan gives. (Padding reshaped with a -1, which a size of 0 leaves undefined: a
    ZeroDivisionError, on the differentiated path too, before 2026-11-27 evening.)"""
    cell, params, xs, _, _ = problem(20, (0,), 5, kind=kind)

    def run(the_cell):
        outputs = jax.jit(lambda p, x: rnnlab.scan(the_cell, p, x))(params, xs)
        grad = jax.jit(jax.grad(lambda p, x: jnp.sum(rnnlab.scan(the_cell, p, x)[0]) + 1.0))(params, xs)
        return outputs, grad

    (outputs, grad), (want, want_grad) = run(cell), run(plain_twin(cell))
    assert outputs[0].shape == (5, 0, 20)
    jax.tree_util.tree_map(np.testing.assert_array_equal, (outputs, grad), (want, want_grad))


@needs_kernels
def test_where_the_weight_gradient_is_formed():
    """The kernels' vector width is the CPU's (built with -march=native): 16 floats with AVX-512, else 8. From
    MIN_ROWS_FOR_WEIGHT_GRAD rows the kernels sum W_h's gradient, except the LSTM's without AVX-512 (XLA's matmul
    after the loop was faster there), and the program says so."""
    lanes = native.vector_lanes()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        assert lanes == (16 if " avx512f" in cpuinfo.read_text() else 8)
    rows = native.MIN_ROWS_FOR_WEIGHT_GRAD
    assert [native.weight_grad_mode(cell, rows - 1) for cell in ("lstm", "gru", "rnn")] == ["xla"] * 3
    assert native.weight_grad_mode("gru", rows) == native.weight_grad_mode("rnn", rows) == "kernel"
    assert native.weight_grad_mode("lstm", rows) == ("kernel" if lanes == 16 else "xla")
    cell, params, xs, carry, weights = problem(32, (rows,), 3, kind="LSTM")
    lowered = jax.jit(jax.grad(loss_fn(cell, weights, False))).lower(params, xs, carry).as_text()
    assert f"weight_grad = {str(lanes == 16).lower()}" in lowered


@needs_kernels
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-tanh"])
def test_forward_mode_and_second_derivatives_through_the_kernels(kind):
    """`jax.jvp` and forward-over-reverse (a Hessian-vector product) through `rnnlab.scan`: the primitives'
    derivative rules are the plain-JAX reference's."""
    cell, params, xs, carry, weights = problem(32, (4,), 6, kind=kind)
    native_loss, plain_loss = loss_fn(cell, weights, False), loss_fn(plain_twin(cell), weights, False)
    tangents = jax.tree_util.tree_map(jnp.cos, (params, xs, carry))

    def jvp_and_hvp(loss):
        _, jvp = jax.jvp(loss, (params, xs, carry), tangents)
        _, hvp = jax.jvp(jax.grad(loss, argnums=(0, 1, 2)), (params, xs, carry), tangents)
        return jvp, hvp

    assert_trees_close(jax.jit(lambda: jvp_and_hvp(native_loss))(), jax.jit(lambda: jvp_and_hvp(plain_loss))(),
                       rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("shared_weights", [True, False], ids=["shared-weights", "per-example-weights"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-relu"])
def test_vmap_through_the_kernels(kind, shared_weights):
    """vmap of the gradient and of the outputs over 3 problems: with shared weights the mapped axis joins the
    kernel's batch axis; with per-example weights each example is one kernel call."""
    cell, params, xs, carry, weights = problem(32, (4,), 5, kind=kind)
    stacked_xs = jnp.stack([xs, 2 * xs, -xs])
    stacked_params = jax.tree_util.tree_map(lambda p: jnp.stack([p, 0.9 * p, 1.1 * p]), params)
    in_axes = (None, 0) if shared_weights else (0, 0)
    the_params = params if shared_weights else stacked_params

    def grads(the_cell):  # and the outputs, which nothing differentiates (the LSTM's `lstm_infer_p`)
        loss = loss_fn(the_cell, weights, False)
        return jax.vmap(lambda p, x: (jax.grad(loss)(p, x, carry), rnnlab.scan(the_cell, p, x, carry=carry)),
                        in_axes=in_axes)(the_params, stacked_xs)

    assert calls_kernel(lambda: grads(cell))
    assert_trees_close(jax.jit(lambda: grads(cell))(), jax.jit(lambda: grads(plain_twin(cell)))(),
                       rtol=2e-5, atol=2e-5)


def _run(code: str, env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# W_h's LSTM gradient under each setting of `runs` in turn (the settings are read when a program is traced), saved
# as <name>.npy in `folder`.
_GRAD_PROGRAM = """
    import os, jax, jax.numpy as jnp, numpy as np, rnnlab
    from rnnlab import native
    cell = rnnlab.LSTM(hidden_size=64)
    params = cell.init(jax.random.PRNGKey(0), 8)
    xs = jax.random.normal(jax.random.PRNGKey(1), (50, 16, 8))
    for name, env in {runs!r}.items():
        os.environ.update(env)
        grad = jax.jit(jax.grad(lambda p: jnp.mean(rnnlab.scan(cell, p, xs)[0] ** 2)))(params)
        for leaf in ("w_h", "w_x"):
            np.save(os.path.join({folder!r}, name + "-" + leaf + ".npy"), np.asarray(grad[leaf]))
        print(name, "available", native.available())
        for key in env:
            del os.environ[key]
"""


# The LSTM's gradient split by rows (batch 32: two groups, `share_out`) and by units (batch 4, hidden 256: a team
# that meets at a barrier every step), 2 threads per kernel, 30 calls each, then (with 2 CPUs or more) 10 more with
# every thread's CPU mask narrowed to one CPU; W_h's gradients saved in `folder` as <name>-<split>[-one-cpu].npy.
# Printed: whether a thread stepped aside, whether every thread's mask is still the process's at the start; on one
# CPU, the steps aside there and whether every mask is still that CPU.
_ASIDE_PROGRAM = """
    import os
    import jax, jax.numpy as jnp, numpy as np, rnnlab
    from rnnlab import native
    mask = os.sched_getaffinity(0)

    def masks():
        found = []
        for tid in os.listdir("/proc/self/task"):
            try:
                found.append(os.sched_getaffinity(int(tid)))
            except OSError:  # the thread ended meanwhile
                pass
        return found

    calls = {{}}
    for split, batch, hidden in (("rows", 32, 64), ("units", 4, 256)):
        cell = rnnlab.LSTM(hidden_size=hidden)
        params = cell.init(jax.random.PRNGKey(0), 8)
        xs = jax.random.normal(jax.random.PRNGKey(1), (50, batch, 8))
        grad = jax.jit(jax.grad(lambda p, x, cell=cell: jnp.mean(rnnlab.scan(cell, p, x)[0] ** 2)))
        calls[split] = lambda grad=grad, params=params, xs=xs: jax.block_until_ready(grad(params, xs))
        np.save(os.path.join({folder!r}, {name!r} + "-" + split + ".npy"), np.asarray(calls[split]()["w_h"]))
        for _ in range(30):
            calls[split]()
    print("stepped aside", native.steps_aside() > 0, "masks kept", all(m == mask for m in masks()))
    if len(mask) > 1:
        cpu = min(mask)
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), {{cpu}})
            except OSError:
                pass
        before = native.steps_aside()
        for split, call in calls.items():
            np.save(os.path.join({folder!r}, {name!r} + "-" + split + "-one-cpu.npy"), np.asarray(call()["w_h"]))
            for _ in range(10):
                call()
        print("one cpu: stepped aside", native.steps_aside() - before, "masks kept", all(m == {{cpu}} for m in masks()))
"""


@needs_kernels
def test_kernels_that_step_aside_keep_the_numbers_and_each_threads_cpu_mask(tmp_path):
    """A helper that starts on its caller's CPU, or a caller whose helper has not started in time, moves itself to
    another CPU of its mask (`recurrent.cc`'s `step_aside`: the mask narrowed, then widened again at once). With
    ``RNNLAB_NATIVE_HELPER_START_US=0`` a caller steps aside whenever its helper has not started at once: some do,
    the gradients are the same bit for bit as by default, and every thread's CPU mask is the one it had. With every
    thread's mask narrowed to one CPU there is nowhere to go: no thread steps aside, the masks stay, and the numbers
    are the same."""
    for name, env in {"default": {}, "aside": {"RNNLAB_NATIVE_HELPER_START_US": "0"}}.items():
        done = _run(_ASIDE_PROGRAM.format(folder=str(tmp_path), name=name), {"RNNLAB_NATIVE_THREADS": "2", **env})
        assert done.returncode == 0, done.stderr
        assert "masks kept True" in done.stdout.split("\n")[0], (name, done.stdout)
        if len(os.sched_getaffinity(0)) > 1:  # else there is nowhere to step aside to
            if name == "aside":
                assert "stepped aside True" in done.stdout, done.stdout
            assert "one cpu: stepped aside 0 masks kept True" in done.stdout, (name, done.stdout)
    for split in ("rows", "units"):
        default = np.load(tmp_path / f"default-{split}.npy")
        others = sorted(tmp_path.glob(f"*-{split}*.npy"))
        assert len(others) >= 2, others
        for other in others:
            np.testing.assert_array_equal(np.load(other), default, err_msg=other.name)


@needs_kernels
def test_threads_oversubscription_and_fallback_give_the_same_numbers(tmp_path):
    """The same gradient with 1 and 3 threads per kernel (bit for bit); with the kernels off, or unbuildable (no
    compiler: a warning, and XLA runs the LSTM); and with the batch split over 2 CPU devices running at once, 3
    threads per kernel (more than XLA's pool, so a kernel's helper task may never start: it must not hang), where
    each device must run the kernels on its own rows, split by `custom_partitioning` or by `native.split_batch`."""
    runs = {"one-thread": {"RNNLAB_NATIVE_THREADS": "1"}, "three-threads": {"RNNLAB_NATIVE_THREADS": "3"},
            "off": {"RNNLAB_NATIVE": "0"}}
    together = _run(_GRAD_PROGRAM.format(runs=runs, folder=str(tmp_path)), {})
    assert together.returncode == 0, together.stderr
    # A process whose kernels cannot be built (the library is built once per process).
    no_compiler = _run(_GRAD_PROGRAM.format(runs={"no-compiler": {}}, folder=str(tmp_path)),
                       {"CXX": "no-such-compiler", "RNNLAB_NATIVE_CACHE": str(tmp_path / "cache")})
    assert no_compiler.returncode == 0, no_compiler.stderr
    assert "no C++ compiler 'no-such-compiler'" in no_compiler.stderr
    assert together.stdout.split("\n")[:3] == [f"{name} available {name != 'off'}" for name in runs], together.stdout
    assert "no-compiler available False" in no_compiler.stdout
    results = {name: np.load(tmp_path / f"{name}-w_h.npy") for name in [*runs, "no-compiler"]}
    # Each row's units are computed by one thread in a fixed order whatever the split: W_x's gradient, XLA's matmul
    # of the kernel's cotangents, is bit-identical; W_h's, summed per group of rows in the kernel (16 rows: two
    # groups), within float32 rounding.
    np.testing.assert_array_equal(*(np.load(tmp_path / f"{name}-w_x.npy") for name in ("three-threads", "one-thread")))
    np.testing.assert_allclose(results["three-threads"], results["one-thread"], rtol=1e-5, atol=1e-9)
    for name in ("off", "no-compiler"):
        np.testing.assert_allclose(results[name], results["one-thread"], rtol=1e-5, atol=1e-7)

    two_devices = _run("""
        import os
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
        import jax, jax.numpy as jnp, numpy as np, rnnlab
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from rnnlab import native
        cell = rnnlab.LSTM(hidden_size=64)
        params = cell.init(jax.random.PRNGKey(0), 8)
        xs = jax.random.normal(jax.random.PRNGKey(1), (50, 32, 8))
        mesh = Mesh(np.array(jax.devices()), ("batch",))
        xs = jax.device_put(xs, NamedSharding(mesh, P(None, "batch")))
        def loss(p, x):
            return jnp.mean(rnnlab.scan(cell, p, x)[0] ** 2)
        grad = jax.jit(jax.grad(loss))
        ref = jax.jit(jax.grad(loss))(params, np.asarray(xs))
        for _ in range(20):
            got = grad(params, xs)
        np.testing.assert_allclose(got["w_h"], ref["w_h"], rtol=1e-5, atol=1e-7)
        # Each device runs the kernels on its own 16 rows, and nothing gathers the batch.
        lowered = grad.lower(params, xs)
        compiled = lowered.compile().as_text()
        print("CustomSPMDPartitioning" in lowered.as_text(), "all-gather" in compiled, "f32[50,16,256]" in compiled,
              "rnnlab_lstm_backward" in compiled)
        # The same split by shard_map (native.split_batch), with no custom_partitioning call, padded sequences too.
        def padded_loss(p, x, lengths=None):
            return jnp.mean(rnnlab.scan(cell, p, x, lengths=lengths)[0] ** 2)
        @jax.jit
        def split_grad(p, x, lengths=None):
            with native.split_batch(mesh, "batch"):
                return jax.grad(padded_loss)(p, x, lengths)
        for extra in ((), (jnp.arange(32) % 40 + 11,)):
            ref = jax.jit(jax.grad(padded_loss))(params, np.asarray(xs), *extra)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         split_grad(params, xs, *extra), ref)
            lowered = split_grad.lower(params, xs, *extra)
            compiled = lowered.compile().as_text()
            print("CustomSPMDPartitioning" in lowered.as_text(), "all-gather" in compiled,
                  "f32[50,16,256]" in compiled, "rnnlab_lstm_backward" in compiled)
    """, {"RNNLAB_NATIVE_THREADS": "3"}, timeout=300)
    assert two_devices.returncode == 0, two_devices.stderr
    lines = two_devices.stdout.strip().split("\n")
    assert lines[-3].split() == ["True", "False", "True", "True"], two_devices.stdout
    assert lines[-2].split() == lines[-1].split() == ["False", "False", "True", "True"], two_devices.stdout


@needs_kernels
def test_jax_export_lowers_to_xla_loops():
    """`jax.export` accepts no custom call without a compatibility guarantee: an exported program carries the
    plain-JAX loops, and computes what the kernels do."""
    cell, params, xs, carry, weights = problem(32, (4,), 6)
    grad = jax.jit(jax.grad(loss_fn(cell, weights, False)))
    exported = jax.export.export(grad)(params, xs, carry)
    assert "custom_call @rnnlab" not in exported.mlir_module()
    assert calls_kernel(jax.grad(loss_fn(cell, weights, False)), params, xs, carry)
    assert_trees_close(exported.call(params, xs, carry), grad(params, xs, carry), rtol=2e-5, atol=2e-6)


def step_copies(make_function, args, platform, variable, value, monkeypatch) -> int:
    """Copies of a loop's step in ``make_function()`` exported for ``platform`` (no such device needed) with
    ``$variable`` set to ``value`` (unset: None). A step's body is an outlined function called once per step (jax
    0.10) or inlined (jax 0.11): each copy adds a call or at least one matmul."""
    if value is None:
        monkeypatch.delenv(variable, raising=False)
    else:
        monkeypatch.setenv(variable, value)
    function = jax.jit(make_function())  # a new function each time: JAX caches lowerings
    text = jax.export.export(function, platforms=(platform,))(*args).mlir_module()
    return text.count("call @") + text.count("stablehlo.dot_general")


@pytest.mark.parametrize("kind,padded", [("LSTM", False), ("GRU", False), ("RNN-tanh", False), ("GRU", True)],
                         ids=["LSTM", "GRU", "RNN-tanh", "GRU-padded"])
def test_on_a_gpu_the_loops_lower_unrolled(kind, padded, monkeypatch):
    """A GPU runs an XLA loop's iterations one launch sequence at a time, so there the primitives' loops are
    unrolled (`native.gpu_unroll`; run and timed on a GPU by `benchmarks/gpu.sh`). Lowered for CUDA here (no GPU
    needed): ``$RNNLAB_GPU_UNROLL`` steps of the body per iteration; the CPU program does not change. (At this
    hidden size every cell's loops are Pallas kernels there by default: here with those off, as where they do not
    apply.) Padded
    sequences' masked primitives too."""
    monkeypatch.setenv("RNNLAB_PALLAS", "0")
    cell, params, xs, carry, weights = problem(16, (3,), 20, kind=kind)
    lengths = jnp.array([20, 7, 1]) if padded else None

    def copies(platform, unroll):
        return step_copies(lambda: jax.grad(loss_fn(cell, weights, False, lengths)), (params, xs, carry), platform,
                           "RNNLAB_GPU_UNROLL", unroll, monkeypatch)

    # Forward and backward loops: 7 more copies of each body per iteration.
    assert copies("cuda", "8") - copies("cuda", "1") >= 2 * 7
    assert copies("cpu", "8") == copies("cpu", "1")


# --- the plain RNN on a GPU: Pallas kernels ------------------------------------------------------------------------

needs_pallas_triton = pytest.mark.skipif(pallas._compiler_params() is None,
                                         reason="this JAX has no Pallas Triton backend: the XLA loops run on a GPU")


PALLAS_KINDS = ["RNN-tanh", "RNN-relu", "RNN-linear", "LSTM", "GRU"]


def pallas_problem(kind, steps=9, batch=20, hidden=32):
    """Random operands of ``kind``'s forward primitive, the primitives ``(forward, backward)``, their parameters, a
    function from the forward results to the backward primitive's residuals, the backward cotangents, and a mask
    with invalid steps at the start, the middle and the end of rows, a row with none valid and one all valid."""
    gates = {"LSTM": 4, "GRU": 3}.get(kind, 1)
    keys = iter(jax.random.split(jax.random.PRNGKey(3), 10))
    normal = lambda *shape: jax.random.normal(next(keys), shape)  # noqa: E731
    w_h, h0, c0 = normal(hidden, gates * hidden) / math.sqrt(hidden), normal(batch, hidden), normal(batch, hidden)
    px, g_hs, g_h, g_c = normal(steps, batch, gates * hidden), normal(steps, batch, hidden), *normal(2, batch, hidden)
    valid = (jax.random.uniform(next(keys), (steps, batch)) < 0.6).at[:, 0].set(False).at[:, 1].set(True)
    assert 0 < int(valid.sum()) < valid.size
    if kind == "LSTM":
        return ((w_h, h0, c0, px), (native.lstm_forward_p, native.lstm_backward_p), {},
                lambda hs, cs, gates: (w_h, gates, cs, c0, hs, h0), (g_hs, g_h, g_c), valid)
    if kind == "GRU":
        b_h = normal(gates * hidden)
        return ((w_h, b_h, h0, px), (native.gru_forward_p, native.gru_backward_p), {},
                lambda hs, gates, a_n: (w_h, gates, a_n, hs, h0), (g_hs, g_h), valid)
    return ((w_h, h0, px), (native.rnn_forward_p, native.rnn_backward_p), {"activation": kind.removeprefix("RNN-")},
            lambda hs: (w_h, hs, h0), (g_hs, g_h), valid)


@needs_pallas_triton
@pytest.mark.parametrize("kind", PALLAS_KINDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_pallas_kernels_equal_the_float64_references(kind, reverse, masked, monkeypatch):
    """The GPU kernels (`native.pallas`: the plain RNN's, the LSTM's and the GRU's), run here by Pallas's
    interpreter, against the primitives' references in float64: the forward results, and the backward pass (the
    transpose of the reference tangent by `jax.linear_transpose`: cotangents of the inputs, of W_h in each of its
    modes, of the first carry), each step's inputs read one step ahead (the default) and when used
    (``RNNLAB_PALLAS_AHEAD=0``).
    Batch 20 is padded to 32 rows (two programs). Masked: the twins' kernels, with `pallas_problem`'s mask."""
    problem = pallas_truth(kind, reverse, masked)
    (forward_p, backward_p), params, operands, mask = problem.primitives, problem.params, problem.operands, problem.mask
    results, truth, valid = problem.results, problem.truth, problem.valid
    backward_operands = [*problem.residuals, *mask, *problem.cotangents]
    aval = lambda arrays: [jax.core.ShapedArray(a.shape, a.dtype) for a in arrays]  # noqa: E731
    for ahead, modes in (("1", ("kernel", "xla", "none")), ("0", ("xla",))):
        monkeypatch.setenv("RNNLAB_PALLAS_AHEAD", ahead)
        forward = forward_p.gpu_kernel(aval([*operands, *mask]), params, interpret=True)
        for result, expected in zip(forward(*operands, *mask), results, strict=True):
            np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
        for mode in modes:
            backward = backward_p.gpu_kernel(aval(backward_operands), {**params, "weight_grad": mode},
                                             interpret=True)
            g_u, g_w, *g_carry = backward(*backward_operands)
            np.testing.assert_allclose(g_u, truth[0], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(g_w, 0 * truth[1] if mode == "none" else truth[1], rtol=1e-5, atol=1e-4)
            for result, expected in zip(g_carry, truth[2:], strict=True):
                np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
    if masked:  # the mask mattered: an invalid step's input cotangent is zero, unlike the dense kernels'
        assert np.all(np.asarray(g_u)[~np.asarray(valid)] == 0) and np.any(truth[0][:, 1] != 0)


def pallas_truth(kind, reverse, masked, hidden=32):
    """`pallas_problem` at ``hidden``, with ``operands``, ``cotangents``, ``valid`` (None unless ``masked``) and
    ``mask`` (``(valid,)`` or ``()``); the ``primitives`` ``(forward, backward)`` (the masked twins where
    ``masked``) and their ``params``; in float64 by their references, the forward ``results`` and the backward
    ``truth`` (g_u, W_h's gradient, the first carry's cotangents); ``residuals``, the backward primitive's operands
    before the mask, from the results in float32."""
    operands, primitives, params, residuals, cotangents, valid = pallas_problem(kind, hidden=hidden)
    params = {**params, "reverse": reverse, "threads": 1}
    if masked:
        primitives = tuple(getattr(native, p.name.removeprefix("rnnlab_") + "_masked_p") for p in primitives)
    mask = (valid,) if masked else ()
    with jax.enable_x64(True):
        as64 = lambda arrays: [jnp.asarray(a, jnp.float64) for a in arrays]  # noqa: E731
        results = primitives[0].reference(*as64(operands), *mask, **params)
        truth = primitives[1].reference(*residuals(*results), *mask, *as64(cotangents), **params)
        results, truth = [np.asarray(r) for r in results], [np.asarray(t) for t in truth]
    return types.SimpleNamespace(
        operands=operands, cotangents=cotangents, valid=valid if masked else None, mask=mask, primitives=primitives,
        params=params, results=results, truth=truth,
        residuals=[jnp.asarray(a, jnp.float32) for a in residuals(*results)])


def team_of_four(kind, reverse, masked):
    """`pallas_truth` at hidden 64, and the kernels as a team of 4 programs of 16 units each in Pallas's interpreter,
    ``(forward, backward)``, each taking ``exchange`` (the starting values of its first output, `pallas._run`); the
    truth of the backward kernel's results (the first carry's cotangents after g_u, without W_h's)."""
    problem = pallas_truth(kind, reverse, masked, 64)
    name = {"LSTM": "lstm", "GRU": "gru"}.get(kind, "rnn")
    activation = problem.params.get("activation")
    settings = {"reverse": reverse, "interpret": True, "members": 4, **({"activation": activation} if activation
                                                                         else {})}
    forward = functools.partial(getattr(pallas, name + "_forward"), *problem.operands, problem.valid, **settings)
    backward = functools.partial(getattr(pallas, name + "_backward"), *problem.residuals, *problem.cotangents,
                                 problem.valid, **settings)
    as32 = lambda arrays: [a.astype(np.float32) for a in arrays]  # noqa: E731
    return forward, backward, as32(problem.results), as32([problem.truth[0], *problem.truth[2:]])


def units_of(member, width, hidden=64, units=16):
    """The columns of a ``[..., G·H]`` array (``width = G·H``) that program ``member`` of a team computes."""
    return np.concatenate([np.arange(k * hidden + member * units, k * hidden + (member + 1) * units)
                           for k in range(width // hidden)])


@needs_pallas_triton
@pytest.mark.parametrize("kind", PALLAS_KINDS)
@pytest.mark.parametrize(("reverse", "masked"), [(False, False), (True, True)], ids=["forward-dense", "reverse-masked"])
def test_each_program_of_a_team_computes_its_units(kind, reverse, masked, monkeypatch):
    """A team of 4 programs per 16 rows (`pallas._Team`, on a GPU the LSTM's and GRU's at hidden 128), each
    computing 16 of hidden 64's units, run by Pallas's interpreter, which runs the programs one after another (the
    first program of each team first). The exchange through which the team shares its units every step (the
    forward's ``hs``, the backward's g_u) starts as the float64 references' results, except the first program's
    units, which start as the sentinel: the first program finds the others' units there and its own as it stores
    them, the others find its units only if it stored them. Every result equals the references' (two teams: batch
    20 padded to 32 rows); a program that waited in vain (`PATIENCE` 3 here) would have left NaNs."""
    monkeypatch.setattr(pallas, "PATIENCE", 3)
    forward, backward, results, truth = team_of_four(kind, reverse, masked)
    sentinel = np.array(pallas.SENTINEL, np.int32).view(np.float32)
    for run, expected in ((forward, results), (backward, truth)):
        start = expected[0].copy()
        start[..., units_of(0, start.shape[-1])] = sentinel
        for result, want in zip(run(exchange=start), expected, strict=True):
            np.testing.assert_allclose(result, want, rtol=1e-5, atol=1e-5)


@needs_pallas_triton
@pytest.mark.parametrize("kind", ["RNN-relu", "LSTM", "GRU"])
def test_a_team_that_waits_in_vain_gives_nans_not_wrong_numbers(kind, monkeypatch):
    """A team whose programs do not all run at once (here Pallas's interpreter runs them one after another, the
    exchange starting as the sentinel everywhere) stops waiting after `pallas.PATIENCE` reads of a step instead of
    hanging, and computes on with the sentinel's NaN: every result is NaN or the references' value, and some are
    NaN (the first programs'). The last program finds the others' units of the first step stored, so its units of
    the second step are right."""
    monkeypatch.setattr(pallas, "PATIENCE", 3)
    forward, backward, results, truth = team_of_four(kind, False, True)
    forward, backward = forward(exchange=None), backward(exchange=None)
    for got, expected in zip([*forward, *backward], [*results, *truth], strict=True):
        got = np.asarray(got)
        assert np.isnan(got).any()
        np.testing.assert_allclose(got[~np.isnan(got)], expected[~np.isnan(got)], rtol=1e-5, atol=1e-5)
    assert not np.isnan(results[0]).any() and not np.isnan(truth[0]).any()
    last_units = np.asarray(forward[0])[1][:, units_of(3, 64)], np.asarray(backward[0])[-2][:, units_of(3, 64 * (
        {"LSTM": 4, "GRU": 3}.get(kind, 1)))]  # steps 1 and T - 2: the backward runs from the last step
    assert all(np.isfinite(units).all() for units in last_units)


def test_the_kernels_relu_keeps_a_nan():
    """The plain RNN's ReLU in the kernels is no ``max``: Pallas lowers ``max`` to Triton's ``maxnumf``, which
    turns a NaN into 0 where XLA's ReLU keeps it (checked on a GPU by
    `test_gpu.py::test_pallas_kernels_keep_nans_as_xla_does`; here, where the interpreter's max is XLA's, in the
    kernel's jaxpr)."""
    w_h, h0, px = pallas_problem("RNN-relu")[0]
    jaxpr = jax.make_jaxpr(functools.partial(pallas.rnn_forward, reverse=False, activation="relu",
                                             interpret=True))(w_h, h0, px)
    kernel = str(next(eqn for eqn in jaxpr.eqns if eqn.primitive.name == "pallas_call").params["jaxpr"])
    assert re.search(r"\bmax\b", kernel) is None and "select_n" in kernel
    relu = pallas._activation("relu")
    np.testing.assert_array_equal(relu(jnp.array([-1.0, 0.0, 2.0, jnp.nan])), [0.0, 0.0, 2.0, jnp.nan])


@needs_pallas_triton
def test_on_a_gpu_the_recurrences_run_as_pallas_kernels(monkeypatch):
    """Lowered for CUDA here (no GPU needed; run and timed on a GPU by `benchmarks/gpu.sh`): the forward and
    backward loops of the plain RNN (to hidden 256) and of the LSTM and GRU (to hidden 128) are two Triton calls and
    no XLA loop, for padded sequences too, one program per 16 rows where it holds W_h, else a team of 4 (the grid's
    first axis); ``RNNLAB_PALLAS=0``, a hidden size the kernels do not take, `jax.export`, ROCm and the CPU keep
    XLA's loops."""
    if not pallas_lowering.lowers_for_cuda_here():  # asked here, not while collecting: it lowers a Pallas call
        pytest.skip(pallas_lowering.REASON)

    def lowered(kind, hidden, platform="cuda", pallas="1", export=False, lengths=None):
        monkeypatch.setenv("RNNLAB_PALLAS", pallas)
        cell, params, xs, carry, weights = problem(hidden, (3,), 12, kind=kind)
        grad = jax.jit(jax.grad(loss_fn(cell, weights, False, lengths)))
        if export:
            text = jax.export.export(grad, platforms=(platform,))(params, xs, carry).mlir_module()
        else:
            text = grad.trace(params, xs, carry).lower(lowering_platforms=(platform,)).as_text()
        return text.count("xla.gpu.triton"), text.count("stablehlo.while"), *sorted(set(re.findall(r"grid_x = (\d+)",
                                                                                                text)))

    assert lowered("RNN-tanh", 128) == (2, 0, "1")
    monkeypatch.setenv("RNNLAB_PALLAS_AHEAD", "0")
    assert lowered("RNN-tanh", 64) == (2, 0, "1")  # each step's inputs read when used
    assert lowered("GRU", 32) == (2, 0, "1")
    monkeypatch.delenv("RNNLAB_PALLAS_AHEAD")
    assert lowered("RNN-relu", 16) == (2, 0, "1")
    assert lowered("LSTM", 64) == (2, 0, "1")
    assert lowered("GRU", 64) == (2, 0, "1")
    padded = jnp.array([12, 5, 1])  # padded sequences: the masked twins
    assert lowered("RNN-tanh", 32, lengths=padded) == lowered("LSTM", 16, lengths=padded) == (2, 0, "1")
    # W_h of 256, 192 and 256 KB: teams of 4 programs, each holding a quarter of its columns (or rows, backward).
    assert lowered("LSTM", 128) == lowered("GRU", 128) == lowered("RNN-tanh", 256) == (2, 0, "4")
    assert lowered("LSTM", 128, lengths=padded) == (2, 0, "4")
    assert lowered("RNN-tanh", 64, pallas="0")[0] == 0
    assert lowered("RNN-tanh", 48)[0] == 0
    assert lowered("LSTM", 256)[0] == lowered("GRU", 256)[0] == 0  # W_h of 1 MB and 768 KB: XLA's loops
    assert lowered("RNN-tanh", 64, export=True)[0] == 0
    assert lowered("LSTM", 64, platform="cpu")[0] == 0
    assert lowered("RNN-tanh", 64, platform="rocm")[0] == 0
    # The forward pass alone (`lstm_infer_p`, `gru_forward_inputs_p`, padded their masked twins): there the inputs
    # projected by XLA, then the forward kernel.
    for kind, lengths in itertools.product(("LSTM", "GRU"), (None, padded)):
        cell, params, xs, carry, _ = problem(64, (3,), 12, kind=kind)
        forward = jax.jit(lambda p, x, cell=cell, carry=carry, lengths=lengths: rnnlab.scan(
            cell, p, x, carry=carry, lengths=lengths)[0])
        text = forward.trace(params, xs).lower(lowering_platforms=("cuda",)).as_text()
        assert (text.count("xla.gpu.triton"), text.count("stablehlo.while")) == (1, 0), (kind, lengths)


def benchmark_script(name: str, monkeypatch):
    """``benchmarks/<name>.py`` as a module, imported with ``benchmarks/`` on the path as the scripts expect (they
    import `bench_cells`)."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module(name)


def test_the_mosaic_gpu_probe_kernels_compute_the_recurrence(monkeypatch):
    """`benchmarks/probe_mosaic_rnn.py`, which only a GPU times (`benchmarks/gpu.sh`, part ``mosaic``), kept working
    here: its Mosaic GPU kernels for the tanh RNN's forward and backward recurrences lower for CUDA to TF32
    ``wgmma``s, and in Mosaic GPU's interpreter (a simulated GPU, race detection on) equal a float64 loop of their
    own (``--check``; the interpreter of jax 0.10.0 fails on an indexed barrier, so there only the lowering)."""
    try:
        from jax.experimental.pallas import mosaic_gpu  # noqa: F401
    except ImportError:
        pytest.skip("this JAX has no Mosaic GPU")
    probe = benchmark_script("probe_mosaic_rnn", monkeypatch)
    probe.lower()
    if jax.__version_info__ >= (0, 10, 2):
        probe.check()


@needs_pallas_triton
def test_the_team_step_probe_lowers_each_variant(monkeypatch):
    """`benchmarks/probe_team_step.py`, which only a GPU times (`benchmarks/gpu.sh`, part ``team``), kept working
    here (``--lower``): each patched variant of the teams' exchange lowers for CUDA, to a program other than the
    landed one where it should, and the patches are undone after each."""
    landed = pallas._Team.store, pallas._Team.exchange
    benchmark_script("probe_team_step", monkeypatch).lower_only()
    assert (pallas._Team.store, pallas._Team.exchange) == landed


@needs_pallas_triton
def test_the_pallas_kernels_apply_where_their_offsets_fit(monkeypatch):
    """Where `native.pallas` runs: one W_h ``[H, G·H]`` that one program holds (at most 64 KB) or a team of at most
    `pallas.MAX_TEAM` (each program a quarter of it, at least 16 units), float32, a sequence whose padded rows fit
    Triton's 32-bit offsets and, for a team, whose teams all run at once (here, as without a GPU: at most 16
    programs)."""
    f32 = [jnp.float32] * 3
    monkeypatch.setattr(pallas, "_processors", lambda: pallas.FEWEST_PROCESSORS)  # 132 on an H100
    assert pallas.applies((128, 128), (1000, 16, 128), f32, "tanh")
    assert pallas.applies((16, 16), (3, 1, 16), f32, "linear")
    assert pallas.applies((64, 256), (3, 1, 256), f32)  # the LSTM at hidden 64
    assert pallas.applies((64, 192), (3, 1, 192), f32)  # the GRU at hidden 64
    assert pallas.applies((128, 512), (3, 1, 512), f32)  # the LSTM at hidden 128: a team of 4
    assert pallas.applies((128, 384), (3, 64, 384), f32)  # the GRU: 4 teams of 4
    assert not pallas.applies((128, 384), (3, 65, 384), f32)  # 5 teams of 4: more than 16 programs
    assert pallas.applies((256, 256), (10, 16, 256), f32, "tanh")
    assert not pallas.applies((256, 1024), (3, 1, 1024), f32)  # W_h of 1 MB: a team of 16
    assert not pallas.applies((256, 768), (3, 1, 768), f32)
    assert not pallas.applies((64, 128), (3, 1, 128), f32)  # two gates: no cell
    assert not pallas.applies((64, 256), (3, 1, 256), f32, "tanh")  # an activation names the plain RNN
    assert [pallas.team_size((h, g * h), 16) for h, g in [(16, 4), (64, 4), (128, 1), (128, 3), (128, 4), (256, 1)]] \
        == [1, 1, 1, 4, 4, 4]
    with mock.patch.object(pallas, "MAX_TEAM", 16):  # the LSTM at hidden 256 in 16 programs of 16 units
        assert pallas.team_size((256, 1024), 16) == 16
        assert pallas.team_size((256, 1024), 17) is None  # two teams: 32 programs
        assert pallas.team_size((128, 512), 16) == 4
    with mock.patch.object(pallas, "HELD_FLOATS", 64):  # a team of 4 programs of 4 units: too narrow
        assert pallas.team_size((16, 16), 16) is None
    assert not pallas.applies((3, 64, 64), (10, 16, 64), f32, "tanh")  # one W_h per configuration
    assert not pallas.applies((64, 64), (10, 16, 64), [jnp.float32, jnp.float64, jnp.float32], "tanh")
    assert not pallas.applies((64, 64), (10, 16, 64), f32, "softplus")
    # 2^24 steps of 16 rows: 2^35 elements; 2^20 steps of 9 rows (padded to 16) x 128: 2^31.
    assert not pallas.applies((128, 128), (2**24, 16, 128), f32, "tanh")
    assert not pallas.applies((128, 128), (2**20, 9, 128), f32, "tanh")
    assert pallas.applies((128, 128), (2**20 - 1, 9, 128), f32, "tanh")
    assert not pallas.applies((64, 256), (2**19, 9, 256), f32)  # the LSTM's gates [T, B, 4H]: 2^31
    assert pallas.applies((64, 256), (2**19 - 1, 9, 256), f32)
    assert not pallas.applies((128, 128), (10, 0, 128), f32, "tanh")  # no rows: no grid


@needs_kernels
@needs_pallas_triton
@pytest.mark.parametrize("kind,reverse,padded", [("RNN-tanh", False, False), ("RNN-relu", True, False),
                                                  ("RNN-linear", True, False), ("RNN-tanh", False, True),
                                                  ("LSTM", False, False), ("LSTM", True, True), ("GRU", True, False),
                                                  ("GRU", False, True)])
def test_the_gpu_lowering_equals_the_xla_loops(kind, reverse, padded, monkeypatch):
    """The GPU lowering rule of a cell's primitives (`p.gpu_rule`: the Pallas kernels and W_h's gradient after them;
    lowered for a CPU, the kernels run in Pallas's interpreter) put in place of their CPU lowering, so `rnnlab.scan`
    runs it here, against `rnnlab.scan` on XLA's loops (``RNNLAB_NATIVE=0``): the loss's gradients, per-example
    gradients under `jax.vmap` (batch 17 joins the kernels' rows, padded to 32), and gradients for stacked weights
    (one call per example). Padded: sequences of lengths 1 to 6 (`lengths`), on the masked twins."""
    from jax._src.interpreters import mlir

    cell = make_cell(kind, 16)
    params = jax.tree_util.tree_map(lambda a: 0.5 * a, cell.init(jax.random.PRNGKey(2), INPUT_SIZE))
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, 0.9 * a]), params)
    xs = jax.random.normal(jax.random.PRNGKey(3), (6, 17, INPUT_SIZE))
    weights = jax.random.normal(jax.random.PRNGKey(4), (6, 17, 16))
    lengths = jnp.arange(17) % 6 + 1 if padded else None

    def loss(params, xs, weights, lengths=lengths):
        ys, final = rnnlab.scan(cell, params, xs, reverse=reverse, lengths=lengths)
        return jnp.sum(weights * ys) + sum(jnp.sum(jnp.cos(leaf)) for leaf in jax.tree_util.tree_leaves(final))

    def gradients(native_on):
        monkeypatch.setenv("RNNLAB_NATIVE", native_on)
        one = lambda p, x, w, n: loss(p, x[:, None], w[:, None], None if n is None else n[None])  # noqa: E731
        per_example = jax.vmap(jax.grad(one), in_axes=(None, 1, 1, None if lengths is None else 0))
        return [jax.jit(jax.grad(loss, argnums=(0, 1)))(params, xs, weights),
                jax.jit(per_example)(params, xs, weights, lengths),
                jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, None, None)))(stacked, xs, weights)]

    expected = gradients("0")
    name = kind.split("-")[0].lower()
    # The LSTM's and the GRU's forward kernels that project their inputs lower there to XLA's projection and the
    # forward primitive, whose rule is the one under test.
    parts = ("forward", "backward") + (() if name == "rnn" else ("forward_inputs",))
    for primitive in (getattr(native, f"{name}_{part}{'_masked' if padded else ''}_p") for part in parts):
        rules = mlir._platform_specific_lowerings["cpu"]
        monkeypatch.setitem(rules, primitive, dataclasses.replace(rules[primitive], rule=primitive.gpu_rule))
    monkeypatch.setenv("RNNLAB_NATIVE", "1")
    text = jax.jit(jax.grad(lambda p: jnp.sum(rnnlab.scan(cell, p, xs, lengths=lengths)[0]))).lower(params).as_text()
    assert f"rnnlab_{name}" not in text  # the C++ kernels' calls: the rule under test replaced them
    assert_trees_close(gradients("1"), expected, rtol=1e-5, atol=1e-5)


# --- the gradient-flow kernel ---------------------------------------------------------------------------------------

FLOW_KINDS = ["LSTM", "GRU", "RNN-tanh", "RNN-relu", "RNN-linear"]


def flow_problem(kind, gains, hidden=32, batch=3, seq_len=60, input_size=5):
    """Stacked parameters of one cell at several recurrent gains, each with its own inputs and initial carry."""
    cell = make_cell(kind, hidden)
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    params = jax.vmap(lambda gain: rnnlab.sweep.scale_recurrent(cell, cell.init(keys[0], input_size), gain))(
        jnp.asarray(gains, jnp.float32))
    xs = jax.random.normal(keys[1], (len(gains), seq_len, batch, input_size))
    carry = jax.tree_util.tree_map(lambda c: 0.3 * jax.random.normal(keys[2], (len(gains),) + c.shape),
                                   cell.initial_carry((batch,)))
    return cell, params, xs, carry


def flow_norms(cell, params, xs, carry, engine, remat=None):
    """log10 ||∂L/∂h_t|| of every configuration: through `gradflow.grad_norms` (the kernel) or the XLA engine."""
    if engine == "kernel":
        one = lambda p, x, c: rnnlab.gradflow.grad_norms(cell, p, x, carry=c, remat=remat)  # noqa: E731
    else:
        one = lambda p, x, c: rnnlab.gradflow.log_domain_norms(cell, p, x, c, remat=remat)  # noqa: E731
    return jax.jit(jax.vmap(one))(params, xs, carry)


def test_on_a_gpu_the_gradient_flow_loops_unroll_when_asked(monkeypatch):
    """On a GPU the gradient-flow primitive lowers to the XLA engine with ``$RNNLAB_GPU_FLOW_UNROLL`` steps per loop
    iteration (default 1; `benchmarks/bench_gradflow_sweep.py` times 8 there). Lowered for CUDA here: 8 puts more
    copies of the step into the program than 1 or the default, and the CPU program does not change."""
    cell, params, xs, carry = flow_problem("LSTM", [0.5, 1.0], hidden=16, seq_len=16)

    def copies(platform, unroll):
        return step_copies(lambda: jax.vmap(lambda p, x, c: rnnlab.gradflow.grad_norms(cell, p, x, carry=c)),
                           (params, xs, carry), platform, "RNNLAB_GPU_FLOW_UNROLL", unroll, monkeypatch)

    assert copies("cuda", None) == copies("cuda", "1")
    # Forward and backward loops: 7 more copies of each step per iteration.
    assert copies("cuda", "8") - copies("cuda", "1") >= 2 * 7
    assert copies("cpu", "8") == copies("cpu", "1")


@needs_kernels
@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_gradflow_kernel_equals_the_log_domain_engine(kind):
    """Every configuration of a vmapped sweep in one kernel call, against the XLA engine in float32, with the
    engine in float64 as the truth (away from chaos, where float32 trajectories part)."""
    gains = [0.5, 1.0, 1.4] if kind != "RNN-relu" else [0.5, 0.9, 1.0]
    cell, params, xs, carry = flow_problem(kind, gains)
    text = jax.jit(jax.vmap(lambda p, x, c: rnnlab.gradflow.grad_norms(cell, p, x, carry=c))).lower(
        params, xs, carry).as_text()
    assert text.count("rnnlab_gradflow") == 1  # one call for all configurations
    got = np.asarray(flow_norms(cell, params, xs, carry, "kernel"), np.float64)
    plain = np.asarray(flow_norms(cell, params, xs, carry, "xla"), np.float64)
    with jax.enable_x64(True):
        as64 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
        truth = np.asarray(flow_norms(cell, *as64((params, xs, carry)), "xla"))
    assert np.all(np.isfinite(truth)) and truth.min() < -5  # the gains reach vanishing gradients
    got_error, plain_error = np.max(np.abs(got - truth)), np.max(np.abs(plain - truth))
    assert got_error <= max(10 * plain_error, 1e-5), (got_error, plain_error)


# (kind, hidden, rows): each step holds enough work for two threads (`native.flow_team`), too few rows for groups.
SPLIT_FLOW_CASES = [("LSTM", 128, 8), ("GRU", 256, 8), ("RNN-tanh", 256, 12)]


@needs_kernels
@pytest.mark.parametrize("kind,hidden,rows", SPLIT_FLOW_CASES, ids=[case[0] for case in SPLIT_FLOW_CASES])
def test_gradflow_kernel_splits_one_configuration_over_threads(kind, hidden, rows):
    """A single configuration (`grad_norms` of one sequence batch) runs on a team of threads that split its hidden
    units, with and without remat: the numbers of the same configuration run whole on one thread (two configurations
    in one call: shared out) but for the order in which the parts' sums of squares are added, and (the LSTM) those
    of the XLA engine in float64. With remat the numbers are bit-identical, also where one of the two calls finds
    the pool busy and runs alone: the sums of squares are formed over the planned parts' units either way (this
    test failed once in `make test`, for the tanh RNN, 2.4e-7 apart, before they were)."""
    cell, params, xs, carry = flow_problem(kind, [1.0, 1.0], hidden=hidden, batch=rows, seq_len=24)
    if native.threads() >= 2:
        assert native.flow_team(cell, 1, rows) == 2 and native.flow_team(cell, 2, rows) == 1
        assert native.flow_groups(rows) == 1
    first = jax.tree_util.tree_map(lambda a: a[:1], (params, xs, carry))
    split = np.asarray(flow_norms(cell, *first, "kernel"))
    np.testing.assert_array_equal(np.asarray(flow_norms(cell, *first, "kernel", remat=6)), split)
    whole = np.asarray(flow_norms(cell, params, xs, carry, "kernel"))[:1]
    np.testing.assert_allclose(split, whole, rtol=0, atol=1e-6)
    if kind != "LSTM":  # the unsplit kernel is held to float64 elsewhere; here once more for the team
        return
    with jax.enable_x64(True):
        as64 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
        truth = np.asarray(flow_norms(cell, *as64(first), "xla"))
    np.testing.assert_allclose(split, truth, rtol=0, atol=1e-4)


# (kind, hidden, rows): groups of 10 and 11 rows; 8 and 8; 8, 9, 8, 9 and 9 (`native.flow_groups`).
GROUP_FLOW_CASES = [("LSTM", 128, 21), ("GRU", 64, 16), ("RNN-tanh", 128, 43)]


@needs_kernels
@pytest.mark.parametrize("kind,hidden,rows", GROUP_FLOW_CASES, ids=[case[0] for case in GROUP_FLOW_CASES])
def test_gradflow_kernel_measures_one_configuration_in_groups_of_rows(kind, hidden, rows):
    """A configuration of 16 rows or more runs as groups of 8 to 15 of its rows, each whole on one thread (no
    barrier), their squared norms added at the end: the numbers of the same configuration run whole (here, before
    the groups: by the XLA engine) to float32 rounding (each group renormalises by its own norm), bit-identical with
    remat and on 1 or 2 threads, two configurations in one call as each alone, and (the LSTM) within float32 rounding
    of the XLA engine in float64."""
    cell, params, xs, carry = flow_problem(kind, [1.0, 1.4], hidden=hidden, batch=rows, seq_len=24)
    assert native.flow_groups(rows) == rows // 8 and native.flow_team(cell, 1, rows) == 1
    first = jax.tree_util.tree_map(lambda a: a[:1], (params, xs, carry))
    grouped = np.asarray(flow_norms(cell, *first, "kernel"))
    np.testing.assert_array_equal(np.asarray(flow_norms(cell, *first, "kernel", remat=6)), grouped)
    both = np.asarray(flow_norms(cell, params, xs, carry, "kernel"))
    np.testing.assert_array_equal(both[:1], grouped)
    with mock.patch.dict(os.environ, RNNLAB_NATIVE_THREADS="1"):  # a new program: `threads` is an attribute
        np.testing.assert_array_equal(np.asarray(flow_norms(cell, params, xs, carry, "kernel")), both)
    engine = np.asarray(flow_norms(cell, params, xs, carry, "xla"))
    np.testing.assert_allclose(both, engine, rtol=0, atol=2e-5)
    if kind != "LSTM":
        return
    with jax.enable_x64(True):
        as64 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
        truth = np.asarray(flow_norms(cell, *as64((params, xs, carry)), "xla"))
    np.testing.assert_allclose(both, truth, rtol=0, atol=1e-4)


@needs_kernels
def test_groups_of_rows_keep_minus_inf_and_nan():
    """Measured in two groups (a ReLU RNN, 16 rows): where the first group's rows stay at zero (no input, no bias:
    its norms -inf) the whole's norms are the other group's, as the XLA engine gives; a nan in one row makes every
    step nan; with W_h zero every step but the last is -inf in both groups, and so in the whole. The whole's rule
    for undefined gradients holds across groups: where the second group's states overflow (an inf input at step 2)
    but its own cotangent is exactly zero (the ReLU off after it), the first group's non-zero cotangent meets them,
    so steps 0-2 are nan, as on XLA and as with 15 rows in one group (a review's case: before, those steps were the
    first group's finite norms)."""
    cell = rnnlab.RNN(32, activation="relu")
    params = {**cell.init(jax.random.PRNGKey(0), 4), "b": jnp.zeros((32,))}
    xs = jax.random.normal(jax.random.PRNGKey(1), (20, 16, 4))
    assert native.flow_groups(16) == 2
    kernel = jax.jit(lambda p, x: rnnlab.gradflow.grad_norms(cell, p, x))
    engine = jax.jit(lambda p, x: rnnlab.gradflow.log_domain_norms(cell, p, x, cell.initial_carry((16,))))
    for name, p, x, inf_and_nan in (("first group zero", params, xs.at[:, :8].set(0.0), (0, 0)),
                                    ("a nan", params, xs.at[7, 12, 1].set(jnp.nan), (0, 20)),
                                    ("W_h zero", {**params, "w_h": jnp.zeros_like(params["w_h"])}, xs, (19, 0))):
        got, want = np.asarray(kernel(p, x)), np.asarray(engine(p, x))
        assert (np.isneginf(got).sum(), np.isnan(got).sum()) == inf_and_nan, name
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=name)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=1e-5, err_msg=name)
    off = {"w_x": jnp.ones((1, 16)), "w_h": jnp.full((16, 16), -0.01), "b": jnp.zeros((16,))}
    small = rnnlab.RNN(16, activation="relu")
    for rows in (16, 15):
        xs = jnp.ones((6, rows, 1)).at[2, 8:, 0].set(jnp.inf)
        got = np.asarray(rnnlab.gradflow.grad_norms(small, off, xs))
        want = np.asarray(rnnlab.gradflow.log_domain_norms(small, off, xs, small.initial_carry((rows,))))
        assert native.flow_groups(rows) == (2 if rows == 16 else 1)
        assert np.all(np.isnan(got[:3])) and np.all(np.isnan(want[:3])), (rows, got, want)
        np.testing.assert_allclose(got[3:], want[3:], rtol=0, atol=1e-5)


@needs_kernels
def test_the_flow_groups_probe_times_each_shape(monkeypatch):
    """`benchmarks/probe_flow_groups.py` (how the groups were measured against teams) at two small shapes: a median
    time and a rate for each, two groups at 16 rows, one at 8."""
    probe = benchmark_script("probe_flow_groups", monkeypatch)
    rows = probe.measure((("LSTM", 16, 32, 20), ("GRU", 8, 32, 20)), calls=2)
    assert [row["shape"] for row in rows] == ["LSTM 16,32,20", "GRU 8,32,20"]
    assert all(row["ms"] > 0 and row["gflops"] > 0 for row in rows)
    assert [row["groups"] for row in rows] == [2, 1]


@needs_kernels
def test_the_cell_rows_probe_times_each_shape(monkeypatch):
    """`benchmarks/probe_cell_rows.py` (how the cell kernels' groups of rows were measured against teams) at two
    small shapes: median times and a rate for each, and how each was split."""
    monkeypatch.setenv("RNNLAB_NATIVE_THREADS", "2")
    probe = benchmark_script("probe_cell_rows", monkeypatch)
    rows = probe.measure((("LSTM", 16, 300, 8, 64), ("GRU", 8, 20, 8, 32)))
    assert [row["shape"] for row in rows] == ["LSTM 16,300,8,64", "GRU 8,20,8,32"]
    assert all(row[key] > 0 for row in rows for key in ("grad_ms", "forward_ms", "gflops"))
    assert [row["split"] for row in rows] == ["2 groups of rows", "units over 1"]


def test_the_page_faults_probe_times_each_library(monkeypatch, capsys):
    """`benchmarks/probe_page_faults.py` (glibc's allocator settings against page faults) at one small shape, in
    this process: the fastest call and the faults per call of rnnlab's LSTM gradient and of torch's."""
    pytest.importorskip("torch")
    probe = benchmark_script("probe_page_faults", monkeypatch)
    monkeypatch.setattr(probe, "SHAPES", ((4, 5, 3, 16),))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    probe.child()
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r"default\t4,5,3,16\trnnlab [0-9.]+ ms, \d+ faults\ttorch [0-9.]+ ms, \d+ faults", line), line


@needs_kernels
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-relu"])
def test_gradflow_kernel_with_remat_runs_each_chunk_again(kind):
    """With ``remat`` the kernel keeps the carry before each chunk and runs the chunk's steps again on the way back:
    exactly the numbers without remat (the same float32 operations in the same order), those of the XLA engine with
    the same remat to float32 rounding, and a workspace of T / remat + remat steps instead of T."""
    cell, params, xs, carry = flow_problem(kind, [0.5, 1.4])
    text = jax.jit(jax.vmap(lambda p, x, c: rnnlab.gradflow.grad_norms(cell, p, x, carry=c, remat=6))).lower(
        params, xs, carry).as_text()
    assert text.count("rnnlab_gradflow") == 1
    whole = np.asarray(flow_norms(cell, params, xs, carry, "kernel"))
    for remat in (1, 6, 20):
        np.testing.assert_array_equal(np.asarray(flow_norms(cell, params, xs, carry, "kernel", remat)), whole)
    engine = np.asarray(flow_norms(cell, params, xs, carry, "xla", 6))
    np.testing.assert_allclose(whole, engine, rtol=0, atol=1e-4)
    # what the kernel allocates (`GradflowImpl`), at T = 10 000: 199 steps' worth against 10 001
    assert native.flow_workspace_bytes(cell, 10_000, 3, 100) < native.flow_workspace_bytes(cell, 10_000, 3) / 20


@needs_kernels
def test_gradflow_kernel_far_below_float32_and_its_nan_and_minus_inf():
    """The closed form of a linear RNN with W = g·Q at 1e-600; -inf where no gradient passes (a ReLU RNN whose
    units are all off); nan where the forward pass overflowed (a ReLU RNN at gain 2), as the XLA engine says."""
    linear = rnnlab.RNN(16, activation="linear", recurrent_init=rnnlab.init.orthogonal(0.5))
    params = linear.init(jax.random.PRNGKey(0), input_size=4)
    xs = jax.random.normal(jax.random.PRNGKey(1), (2000, 8, 4))
    flow = jax.jit(lambda p, x: rnnlab.gradflow.grad_norms(linear, p, x))
    assert "rnnlab_gradflow" in flow.lower(params, xs).as_text()
    measured = np.asarray(flow(params, xs), np.float64)
    last = np.log10(np.linalg.norm(2.0 * np.asarray(rnnlab.scan(linear, params, xs)[0][-1], np.float64) / 8))
    np.testing.assert_allclose(measured, (1999 - np.arange(2000)) * np.log10(0.5) + last, rtol=1e-5, atol=1e-4)

    off = rnnlab.RNN(16, activation="relu", bias_init=rnnlab.init.constant(-100.0))
    assert np.all(np.asarray(rnnlab.gradflow.grad_norms(off, off.init(jax.random.PRNGKey(0), 2),
                                                        jnp.ones((6, 3, 2)))) == -np.inf)
    exploding = rnnlab.RNN(16, activation="relu", recurrent_init=rnnlab.init.identity(2.0))
    params = exploding.init(jax.random.PRNGKey(0), 4)
    xs = jnp.abs(jax.random.normal(jax.random.PRNGKey(1), (300, 3, 4)))
    carry = exploding.initial_carry((3,))
    overflowed = np.asarray(rnnlab.gradflow.grad_norms(exploding, params, xs))
    np.testing.assert_array_equal(np.isnan(overflowed),
                                  np.isnan(rnnlab.gradflow.log_domain_norms(exploding, params, xs, carry)))
    assert np.all(np.isnan(overflowed))
    # Finite states whose loss gradient's norm overflows float32 (|h_T| near 1e29): undefined, never a vanished -inf.
    xs = 0.1 * jax.random.normal(jax.random.PRNGKey(0), (100, 16, 4))
    assert np.all(np.isfinite(rnnlab.scan(exploding, params, xs)[0]))
    for engine in (rnnlab.gradflow.grad_norms(exploding, params, xs),
                   rnnlab.gradflow.log_domain_norms(exploding, params, xs, exploding.initial_carry((16,)))):
        assert np.all(np.isnan(np.asarray(engine)))


@needs_kernels
@pytest.mark.parametrize("kind", ["LSTM", "GRU-16"])
def test_configurations_sharing_inputs_read_them_in_place(kind):
    """`gradflow.grad_norms_of_configs`: configuration c on xs[:, which[c]], in one kernel call, equal to the XLA
    engine on each configuration's own inputs (a GRU of hidden size 16 too, and an LSTM of 12 units, which the
    kernel runs padded to 16)."""
    for hidden in ((32, 12) if kind == "LSTM" else (16,)):
        cell, params, _, _ = flow_problem(kind.split("-")[0], [0.6, 0.9, 1.2, 1.5], hidden=hidden)
        xs = jax.random.normal(jax.random.PRNGKey(3), (25, 2, 3, 5))
        which = jnp.asarray([0, 1, 1, 0])
        shared = jax.jit(lambda p, x, w: rnnlab.gradflow.grad_norms_of_configs(cell, p, x, w))
        assert "rnnlab_gradflow" in shared.lower(params, xs, which).as_text()
        carry = cell.initial_carry((3,))
        each = jax.jit(jax.vmap(lambda p, w: rnnlab.gradflow.log_domain_norms(cell, p, xs[:, w], carry)))(
            params, which)
        np.testing.assert_allclose(shared(params, xs, which), each, rtol=1e-4, atol=1e-4)


# A loss of the user's: on every step, on a window of steps (none after it: -inf there), one that mixes the rows.
USER_LOSSES = {"every step": lambda hs: jnp.sum(hs ** 2) / hs.shape[1],
               "window": lambda hs: jnp.sum(jnp.sin(hs[10:20])),
               "rows mixed": lambda hs: jnp.sum(jnp.mean(hs, axis=1)) ** 2}


@needs_kernels
@pytest.mark.parametrize("kind,rows,hidden", [("LSTM", 3, 32), ("GRU", 16, 32), ("RNN-tanh", 21, 32), ("RNN-relu", 5, 32),
                                             ("LSTM", 16, 20)])
def test_gradflow_kernel_with_a_loss_of_the_users(kind, rows, hidden):
    """A loss of the user's runs in the gradient-flow kernel too (`gradflow_direct_p`: the loss's direct cotangents
    from a forward pass, added at every step at the cotangent's log10 scale): the XLA engine's numbers in float32 to
    rounding, and within float32 rounding of its float64 ones, with their -inf at the same steps; with remat the
    same numbers bit for bit; under vmap, one kernel call for two configurations, each as alone. Hidden 20 runs
    padded to 32."""
    cell, params, xs, carry = flow_problem(kind, [0.9, 1.2], hidden=hidden, batch=rows, seq_len=40)
    first = jax.tree_util.tree_map(lambda a: a[0], (params, xs, carry))
    for name, loss in USER_LOSSES.items():
        def norms(p, x, c, engine="kernel", remat=None, loss=loss):
            if engine == "kernel":
                return rnnlab.gradflow.grad_norms(cell, p, x, carry=c, loss=loss, remat=remat)
            return rnnlab.gradflow.log_domain_norms(cell, p, x, c, loss=loss, remat=remat)

        kernel = jax.jit(norms)
        assert "rnnlab_gradflow_direct" in kernel.lower(*first).as_text(), name
        got = np.asarray(kernel(*first), np.float64)
        engine = np.asarray(jax.jit(functools.partial(norms, engine="xla"))(*first), np.float64)
        with jax.enable_x64(True):
            as64 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
            truth = np.asarray(jax.jit(functools.partial(norms, engine="xla"))(*as64(first)))
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(truth), err_msg=name)
        assert np.isneginf(truth).sum() == (20 if name == "window" else 0), name  # steps 20-39
        finite = np.isfinite(truth)
        assert finite.sum() == truth.size - np.isneginf(truth).sum(), name
        np.testing.assert_allclose(got[finite], engine[finite], rtol=0, atol=2e-5, err_msg=name)
        np.testing.assert_allclose(got[finite], truth[finite], rtol=0, atol=1e-4, err_msg=name)
        np.testing.assert_array_equal(np.asarray(jax.jit(functools.partial(norms, remat=8))(*first)), got,
                                      err_msg=name)
    loss = USER_LOSSES["every step"]
    both = jax.jit(jax.vmap(lambda p, x, c: rnnlab.gradflow.grad_norms(cell, p, x, carry=c, loss=loss)))
    assert both.lower(params, xs, carry).as_text().count("rnnlab_gradflow_direct") == 1
    each = [rnnlab.gradflow.grad_norms(cell, *jax.tree_util.tree_map(lambda a, i=i: a[i], (params, xs)), loss=loss,
                                       carry=jax.tree_util.tree_map(lambda a, i=i: a[i], carry)) for i in range(2)]
    np.testing.assert_allclose(both(params, xs, carry), np.stack(each), rtol=0, atol=1e-6)


@needs_kernels
def test_a_loss_of_the_users_far_below_float32():
    """A linear RNN with W = 0.5·Q over 2000 steps and a loss on its last state plus 1e-30 times one on its first:
    the kernel equals the XLA engine in float64 at every step, the direct term at step 0 (10^-28.7) included beside
    a propagated gradient of 10^-600. The XLA engine in float32 read such a term (squares below float32's range) as
    zero until 2026-11-27 (`gradflow._add_scaled`), and now agrees. A loss's gradient at an overflowed state: nan at
    every step, as on XLA."""
    linear = rnnlab.RNN(16, activation="linear", recurrent_init=rnnlab.init.orthogonal(0.5))
    params = linear.init(jax.random.PRNGKey(0), 4)
    xs = jax.random.normal(jax.random.PRNGKey(1), (2000, 8, 4))

    def loss(hs):
        return jnp.sum(hs[-1] ** 2) + 1e-30 * jnp.sum(hs[0] ** 2)

    got = np.asarray(jax.jit(lambda p, x: rnnlab.gradflow.grad_norms(linear, p, x, loss=loss))(params, xs))
    engine = np.asarray(rnnlab.gradflow.log_domain_norms(linear, params, xs, linear.initial_carry((8,)), loss=loss))
    with jax.enable_x64(True):
        as64 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
        truth = np.asarray(rnnlab.gradflow.log_domain_norms(linear, *as64((params, xs)),
                                                            linear.initial_carry((8,), jnp.float64), loss=loss))
    assert truth[0] > -30 and truth[1] < -599
    np.testing.assert_allclose(got, truth, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(engine, truth, rtol=1e-5, atol=1e-4)
    exploding = rnnlab.RNN(16, activation="relu", recurrent_init=rnnlab.init.identity(2.0))
    params = exploding.init(jax.random.PRNGKey(0), 4)
    xs = jnp.abs(jax.random.normal(jax.random.PRNGKey(1), (300, 3, 4)))
    every = USER_LOSSES["every step"]
    assert np.all(np.isnan(np.asarray(rnnlab.gradflow.grad_norms(exploding, params, xs, loss=every))))
    assert np.all(np.isnan(np.asarray(rnnlab.gradflow.log_domain_norms(exploding, params, xs,
                                                                       exploding.initial_carry((3,)), loss=every))))
    # Finite states, but a direct term whose squares sum past float32's range at step 5 (over all rows: 16 rows in
    # two groups, neither past it alone, and 3 rows in one): nan there and before, as on XLA; finite after it.
    params = linear.init(jax.random.PRNGKey(0), 4)
    for rows, factor in ((3, 1e25), (16, 1.4e18)):
        xs = 0.1 * jax.random.normal(jax.random.PRNGKey(2), (12, rows, 4))
        huge = lambda hs, factor=factor: jnp.sum(hs[-1] ** 2) + factor * jnp.sum(hs[5])  # noqa: E731
        for engine in (rnnlab.gradflow.grad_norms(linear, params, xs, loss=huge),
                       rnnlab.gradflow.log_domain_norms(linear, params, xs, linear.initial_carry((rows,)), loss=huge)):
            engine = np.asarray(engine)
            assert np.all(np.isnan(engine[:6])) and np.all(np.isfinite(engine[6:])), (rows, engine)
    # A direct term of elements around 1e-19, whose squares are at float32's smallest normal numbers: the kernel
    # and the engine in float32 as in float64.
    xs = jax.random.normal(jax.random.PRNGKey(3), (200, 8, 4))
    weights = jnp.ones((8, 16)).at[0, 0].set(1.2)  # squares of 1e-38 are flushed, of 1.44e-38 not
    mixed = lambda hs: jnp.sum(hs[-1] ** 2) + 1e-19 * jnp.sum(hs[0] * weights)  # noqa: E731
    got = np.asarray(rnnlab.gradflow.grad_norms(linear, params, xs, loss=mixed))
    engine = np.asarray(rnnlab.gradflow.log_domain_norms(linear, params, xs, linear.initial_carry((8,)), loss=mixed))
    with jax.enable_x64(True):
        truth = np.asarray(rnnlab.gradflow.log_domain_norms(linear, *as64((params, xs)),
                                                            linear.initial_carry((8,), jnp.float64), loss=mixed))
    assert -19 < truth[0] < -17
    np.testing.assert_allclose(got, truth, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(engine, truth, rtol=1e-5, atol=1e-4)


@needs_kernels
def test_gradflow_kernel_is_differentiable():
    """Derivatives of the measurement with respect to the weights (the primitive's rule is its reference's): equal
    to differentiating the XLA engine, in reverse and forward mode."""
    cell, params, xs, carry = flow_problem("GRU", [0.8], seq_len=20)
    params, xs, carry = jax.tree_util.tree_map(lambda a: a[0], (params, xs, carry))

    def total(engine):
        if engine == "kernel":
            return lambda p: jnp.sum(rnnlab.gradflow.grad_norms(cell, p, xs, carry=carry))
        return lambda p: jnp.sum(rnnlab.gradflow.log_domain_norms(cell, p, xs, carry))

    assert_trees_close(jax.jit(jax.grad(total("kernel")))(params), jax.jit(jax.grad(total("xla")))(params),
                       rtol=1e-4, atol=1e-5)
    direction = jax.tree_util.tree_map(jnp.cos, params)
    jvp = lambda engine: jax.jit(lambda p, d: jax.jvp(total(engine), (p,), (d,))[1])(params, direction)  # noqa: E731
    assert_trees_close(jvp("kernel"), jvp("xla"), rtol=1e-4, atol=1e-5)


@needs_kernels
def test_gradflow_kernel_with_a_loss_of_the_users_is_differentiable():
    """With a loss on the first steps only (the cotangent exactly zero after them), the derivative of the finite
    norms through the kernels equals the XLA engine's and a central difference of the kernels' own norms, and has
    no nan (both had, from a 0·inf at the zero cotangent)."""
    cell, params, xs, carry = flow_problem("LSTM", [0.8], seq_len=20)
    params, xs, carry = jax.tree_util.tree_map(lambda a: a[0], (params, xs, carry))
    window = lambda hs: jnp.sum(hs[:8] ** 2)  # noqa: E731

    def total(engine):
        def finite(p):
            if engine == "kernel":
                norms = rnnlab.gradflow.grad_norms(cell, p, xs, carry=carry, loss=window)
            else:
                norms = rnnlab.gradflow.log_domain_norms(cell, p, xs, carry, loss=window)
            return jnp.sum(jnp.where(jnp.isfinite(norms), norms, 0.0))
        return finite

    norms = np.asarray(rnnlab.gradflow.grad_norms(cell, params, xs, carry=carry, loss=window))
    assert np.all(np.isfinite(norms[:8])) and np.all(norms[8:] == -np.inf)
    kernel = jax.jit(jax.grad(total("kernel")))(params)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(kernel))
    assert_trees_close(kernel, jax.jit(jax.grad(total("xla")))(params), rtol=1e-4, atol=1e-5)
    # The derivative rule is the engine's, so also against the kernel's own values: a central difference along one
    # direction (float32; at this step the difference is within 2e-4 of the derivative).
    direction = jax.tree_util.tree_map(lambda a: jnp.cos(jnp.arange(a.size).reshape(a.shape) + 1.0), params)
    along = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree_util.tree_leaves(kernel),
                                                     jax.tree_util.tree_leaves(direction)))
    value, eps = jax.jit(total("kernel")), 3e-3
    nudged = [value(jax.tree_util.tree_map(lambda p, d, s=s: p + s * eps * d, params, direction)) for s in (1, -1)]
    np.testing.assert_allclose(along, float(nudged[0] - nudged[1]) / (2 * eps), rtol=5e-3)


@needs_kernels
def test_gradflow_kernel_threads_and_devices(tmp_path):
    """Configurations shared out over 1 or 3 threads give bit-identical numbers (each runs whole on one thread);
    split over 2 CPU devices (the sweep's sharding), each device runs the kernel on its own configurations and
    nothing is gathered."""
    program = """
        import os, sys
        import jax, numpy as np
        from rnnlab import sweep
        if sys.argv[-1] == "two":
            sweep.use_cpu_cores(2)
        grid = sweep.Grid.product([0.5, 1.0, 1.5], [0, 1])
        norms, _, _ = sweep.grad_norm_table(sweep.make_cell("lstm", 32), grid, 40, input_size=3, batch=5)
        np.save(sys.argv[-2], norms)
        if sys.argv[-1] == "two":
            cell = sweep.make_cell("lstm", 32)
            sharding, _ = sweep._config_sharding(6)
            params = sweep._spread(sweep.init_configs(cell, grid.seeds, grid.gains, 3), sharding)
            xs = sweep.inputs_configs(grid.seeds, 40, 5, 3, 1.0, sharding=sharding)
            text = sweep.measure_configs.lower(cell, params, xs).compile().as_text()
            print("all-gather" in text, "rnnlab_gradflow" in text, "f32[3,40]" in text)
    """
    results = {}
    for name, threads, devices in (("one", "1", "one"), ("three", "3", "one"), ("two-devices", "1", "two")):
        out = tmp_path / f"{name}.npy"
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(program), str(out), devices], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "RNNLAB_NATIVE_THREADS": threads},
                                capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr
        results[name] = np.load(out)
        if devices == "two":
            assert result.stdout.split()[-3:] == ["False", "True", "True"], result.stdout
    np.testing.assert_array_equal(results["three"], results["one"])
    np.testing.assert_array_equal(results["two-devices"], results["one"])
    assert np.all(np.isfinite(results["one"]))
