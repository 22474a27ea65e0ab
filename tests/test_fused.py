"""The fused recurrences (`rnnlab.fused`) against plain autodiff of the cell's step, and the cell benchmark's code.

The reference is the same cell run through `rnnlab.scan`'s plain path: an instance of a trivial subclass, which
`scan` does not fuse (a subclass may change the step). Every library cell (conftest) × lengths × reverse × batch
shapes; one jitted program per case computes the values and the gradients of both paths (and, in float64, a
forward-mode derivative: the fused rule is a `jax.custom_jvp`, so `jax.jvp` works through it).
"""

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnlab
from rnnlab import fused

ROOT = pathlib.Path(__file__).resolve().parents[1]
INPUT_SIZE, SEQ_LEN = 3, 6


class PlainRNN(rnnlab.RNN):
    pass


class PlainLSTM(rnnlab.LSTM):
    pass


class PlainGRU(rnnlab.GRU):
    pass


_PLAIN = {rnnlab.RNN: PlainRNN, rnnlab.LSTM: PlainLSTM, rnnlab.GRU: PlainGRU}


def plain_twin(cell):
    """The same cell, as a subclass instance: `scan` runs it on the plain (autodiff) path."""
    fields = {field.name: getattr(cell, field.name) for field in dataclasses.fields(cell) if field.init}
    return _PLAIN[type(cell)](**fields)


def random_problem(cell, batch_shape, dtype, with_lengths):
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    params = cell.init(keys[0], INPUT_SIZE, dtype)
    # Non-zero biases and an initial carry away from zero exercise every term of the tangent.
    params = jax.tree_util.tree_map(lambda p: p + 0.3 * jax.random.normal(keys[1], p.shape, dtype), params)
    xs = jax.random.normal(keys[2], (SEQ_LEN, *batch_shape, INPUT_SIZE), dtype)
    carry = jax.tree_util.tree_map(
        lambda c: 0.5 * jax.random.normal(keys[3], c.shape, dtype), cell.initial_carry(batch_shape, dtype)
    )
    lengths = None
    if with_lengths:
        lengths = jax.random.randint(keys[4], batch_shape, 1, SEQ_LEN + 1)
        lengths = lengths.at[(0,) * len(batch_shape)].set(SEQ_LEN)  # one full-length sequence, always
    return params, xs, carry, lengths


def both_paths(cell, params, xs, carry, lengths, reverse, forward_mode=False):
    """Outputs, gradients (params, xs, carry) and, with ``forward_mode``, a JVP of the fused path and of the plain
    path, in one program."""
    weights = jax.random.normal(jax.random.PRNGKey(7), xs.shape[:-1] + (cell.hidden_size,), xs.dtype)

    def run(the_cell, params, xs, carry):
        ys, final = rnnlab.scan(the_cell, params, xs, carry=carry, lengths=lengths, reverse=reverse)
        # A loss touching every output and every leaf of the final carry, with unequal weights.
        carry_terms = sum(jnp.sum(jnp.cos(leaf)) for leaf in jax.tree_util.tree_leaves(final))
        return jnp.sum(weights * jnp.sin(ys)) + carry_terms, (ys, final)

    def evaluate(the_cell):
        (_, outputs), grads = jax.value_and_grad(run, argnums=(1, 2, 3), has_aux=True)(the_cell, params, xs, carry)
        if not forward_mode:
            return outputs, grads, ()
        tangents = jax.tree_util.tree_map(jnp.cos, (params, xs, carry))
        _, jvp = jax.jvp(lambda p, x, c: run(the_cell, p, x, c)[0], (params, xs, carry), tangents)
        return outputs, grads, jvp

    return jax.jit(lambda: (evaluate(cell), evaluate(plain_twin(cell))))()


def assert_trees_close(got, want, rtol, atol, scaled=False):
    """Leaf by leaf, ``|got - want| <= atol + rtol |want|``; with ``scaled``, ``atol`` is at least ``rtol`` times the
    leaf's largest magnitude: float32 rounding in a sum is relative to its largest terms, so an element that is
    small by cancellation carries the absolute error of its leaf's large elements."""
    for got_leaf, want_leaf in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        want_leaf = np.asarray(want_leaf)
        leaf_atol = max(atol, rtol * float(np.max(np.abs(want_leaf), initial=0.0))) if scaled else atol
        np.testing.assert_allclose(np.asarray(got_leaf), want_leaf, rtol=rtol, atol=leaf_atol)


@pytest.mark.parametrize("batch_shape", [(), (2, 3)], ids=["unbatched", "batch2x3"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_fused_equals_autodiff_float32(cell, batch_shape, with_lengths, reverse):
    assert fused.supports(cell, cell.init(jax.random.PRNGKey(0), INPUT_SIZE), cell.initial_carry(()), jnp.zeros(1))
    problem = random_problem(cell, batch_shape, jnp.float32, with_lengths)
    (fused_out, fused_grads, _), (plain_out, plain_grads, _) = both_paths(cell, *problem, reverse)
    # The linear RNN's gradients reach a few hundred here: elementwise tolerances alone fail on some CPUs (XLA's
    # float32 sums in another order: 2.4e-3 off where the leaf's largest value is 239). Its hidden size of 5 runs on
    # the C++ kernels (padded to 16), whose float32 sums differ from XLA's unoptimised ones (`make test`): against
    # float64, the unbatched linear RNN's bias gradient was 2.5e-5 off in the kernels and 5.6e-5 in XLA, where the
    # leaf's largest value is 3.2, and the two paths 4.6e-5 of it apart. The other cells' paths agree within 6e-7.
    linear = isinstance(cell, rnnlab.RNN) and cell.activation == "linear"
    assert_trees_close(fused_out, plain_out, rtol=1e-6, atol=1e-6, scaled=True)
    assert_trees_close(fused_grads, plain_grads, rtol=1e-4 if linear else 2e-5, atol=2e-6, scaled=True)


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_fused_equals_autodiff_float64(cell, with_lengths, reverse):
    with jax.enable_x64(True):
        problem = random_problem(cell, (2, 3), jnp.float64, with_lengths)
        fused_results, plain_results = both_paths(cell, *problem, reverse, forward_mode=True)
        (fused_out, fused_grads, fused_jvp), (plain_out, plain_grads, plain_jvp) = fused_results, plain_results
        assert fused_grads[0]["w_h"].dtype == jnp.float64
        assert_trees_close(fused_out, plain_out, rtol=1e-13, atol=1e-14)
        assert_trees_close(fused_grads, plain_grads, rtol=1e-12, atol=1e-13)
        assert_trees_close(fused_jvp, plain_jvp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_step_loss", [False, True], ids=["last_step_loss", "per_step_loss"])
@pytest.mark.parametrize("remat", [None, 10], ids=["stored", "remat"])
def test_grad_norms_from_fused_coefficients_equal_the_step_vjp(cell, per_step_loss, remat):
    """`gradflow.grad_norms` runs its backward pass on `fused.linearised_steps` for the built-in cells; the plain
    twin takes the generic path (vjp of the step at each stored carry). In float64, over 40 steps of a batch [2, 3]."""
    with jax.enable_x64(True):
        params, xs, carry, _ = random_problem(cell, (2, 3), jnp.float64, with_lengths=False)
        xs = jnp.concatenate([xs] * 7)[:40]
        loss = (lambda hs: jnp.sum(jnp.sin(hs))) if per_step_loss else None

        def norms(the_cell):
            return rnnlab.gradflow.grad_norms(the_cell, params, xs, carry=carry, loss=loss, remat=remat)

        fused_norms, plain_norms = jax.jit(lambda: (norms(cell), norms(plain_twin(cell))))()
        assert np.all(np.isfinite(plain_norms))
        np.testing.assert_allclose(fused_norms, plain_norms, rtol=1e-10, atol=1e-10)


def test_fused_path_is_taken_only_for_exact_builtin_cells():
    carry, projected = jnp.zeros(5), jnp.zeros((2, 5))
    cell = rnnlab.RNN(hidden_size=5)
    params = cell.init(jax.random.PRNGKey(0), 3)
    assert fused.supports(cell, params, carry, projected)
    assert not fused.supports(plain_twin(cell), params, carry, projected)
    assert not fused.supports(rnnlab.RNN(hidden_size=5, activation=jnp.sin), params, carry, projected)
    with jax.enable_x64(True):
        assert not fused.supports(cell, params, carry, projected.astype(jnp.float64))  # mixed dtypes: plain path


@pytest.mark.slow  # about 20-35 s: imports torch and flax, compiles each library's program at two tiny shapes
def test_benchmark_quick_mode_runs():
    """`benchmarks/run.py --quick cells forward` runs bench_cells.py and bench_forward.py on tiny shapes and
    collects their target rows."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "cells", "forward"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.split("## Summary")[1]
    assert "| cells | LSTM 5,4,3,8 vs torch.nn.LSTM |" in summary
    assert "| cells | LSTM 5,4,3,8 vs flax OptimizedLSTMCell |" in summary
    assert "| forward | LSTM 5,4,3,8 forward alone vs torch.nn.LSTM |" in summary
    assert "targets hold" in summary
