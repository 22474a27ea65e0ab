"""On a GPU: rnnlab's cells compute what cuDNN computes with the same weights — outputs, final carries, and the
gradients of a loss with respect to the weights and the inputs.

Two independent cuDNN front ends are the reference: `jax.experimental.rnn.lstm` (JAX's cuDNN LSTM) and
``torch.nn.RNN / LSTM / GRU`` on CUDA. Both are asked for full float32 arithmetic (no TF32), as the comparison is of
the maths, not of the precision each library picks by default. Skipped where JAX has no GPU (CI); run on a GPU
machine with ``python -m pytest tests/test_gpu.py``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fused import assert_trees_close
from test_interop import torch_grads_in_rnnlab_layout

import rnnlab
from rnnlab import interop

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: compares with cuDNN")

SEQ_LEN, BATCH, INPUT_SIZE, HIDDEN = 40, 8, 24, 64
# float32 through 40 steps, cuDNN summing in its own order: agreement to a few hundred ulps of each array's largest
# values (an element small by cancellation carries the absolute error of the large terms it sums: 9.5e-5 where a
# weight gradient's largest element is 6, on an H200).
RTOL = 2e-4


def close(actual, expected):
    assert_trees_close(actual, expected, rtol=RTOL, atol=0.0, scaled=True)


def data(seed=0):
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((SEQ_LEN, BATCH, INPUT_SIZE)).astype(np.float32)
    out_weights = np.cos(np.arange(SEQ_LEN * BATCH * HIDDEN, dtype=np.float32)).reshape(SEQ_LEN, BATCH, HIDDEN)
    return xs, out_weights


def rnnlab_loss(cell, params, xs, out_weights):
    ys, final = rnnlab.scan(cell, params, xs)
    return jnp.sum(ys * out_weights), (ys, final)


@jax.default_matmul_precision("float32")
def test_lstm_matches_jax_cudnn_lstm():
    from jax.experimental import rnn

    xs, out_weights = data()
    cell = rnnlab.LSTM(HIDDEN)
    params = cell.init(jax.random.PRNGKey(0), INPUT_SIZE)
    zeros = jnp.zeros((1, BATCH, HIDDEN))
    # cuDNN's operands and results enter and leave its program batch-major, untransposed: its custom call fixes no
    # memory layout, and with a transpose beside it inside the jit XLA gave the call a time-major buffer, which
    # cuDNN read as batch-major (jax 0.11.2 on an H200: every sequence but the first wrong from step 0).
    xs_batch_major = jnp.asarray(np.ascontiguousarray(np.swapaxes(xs, 0, 1)))
    weights_batch_major = np.ascontiguousarray(np.swapaxes(out_weights, 0, 1))

    def cudnn_loss(weights, xs_batch_major):
        ys, h_n, c_n = rnn.lstm(xs_batch_major, zeros, zeros, weights,
                                seq_lengths=jnp.full((BATCH,), SEQ_LEN, jnp.int32), input_size=INPUT_SIZE,
                                hidden_size=HIDDEN, num_layers=1, dropout=0.0, bidirectional=False,
                                precision=jax.lax.Precision.HIGHEST)
        return jnp.sum(ys * weights_batch_major), (ys, (h_n[0], c_n[0]))

    weights = interop.to_cudnn_lstm(cell, params)
    (w_grad, x_grad), (ys, final) = jax.jit(jax.grad(cudnn_loss, argnums=(0, 1), has_aux=True))(
        weights, xs_batch_major)
    (grads, our_x_grad), (our_ys, our_final) = jax.jit(
        jax.grad(lambda p, x: rnnlab_loss(cell, p, x, out_weights), argnums=(0, 1), has_aux=True))(params, xs)
    close(our_ys, np.swapaxes(ys, 0, 1))
    jax.tree_util.tree_map(close, our_final, final)
    close(our_x_grad, np.swapaxes(x_grad, 0, 1))
    jax.tree_util.tree_map(close, grads, jax.vjp(lambda p: interop.to_cudnn_lstm(cell, p), params)[1](w_grad)[0])


@pytest.fixture
def torch_in_float32():
    """torch with TF32 off in cuDNN and cuBLAS for the test, its settings restored after."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield torch
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("cell", [rnnlab.RNN(HIDDEN, activation="tanh"), rnnlab.RNN(HIDDEN, activation="relu"),
                                  rnnlab.LSTM(HIDDEN), rnnlab.GRU(HIDDEN)], ids=["rnn_tanh", "rnn_relu", "lstm", "gru"])
@jax.default_matmul_precision("float32")
def test_cells_match_torch_cudnn(cell, torch_in_float32):
    torch = torch_in_float32
    xs, out_weights = data(1)
    params = jax.tree_util.tree_map(lambda a: 0.5 * a, cell.init(jax.random.PRNGKey(1), INPUT_SIZE))
    module = interop.to_torch(cell, params).cuda()
    torch_xs = torch.tensor(xs, device="cuda", requires_grad=True)
    ys, final = module(torch_xs)
    (ys * torch.tensor(out_weights, device="cuda")).sum().backward()

    (grads, our_x_grad), (our_ys, our_final) = jax.jit(
        jax.grad(lambda p, x: rnnlab_loss(cell, p, x, out_weights), argnums=(0, 1), has_aux=True))(params, xs)
    close(our_ys, ys.detach().cpu().numpy())
    torch_final = final if isinstance(final, tuple) else (final,)
    for ours, theirs in zip(jax.tree_util.tree_leaves(our_final), torch_final):
        close(ours, theirs[0].detach().cpu().numpy())
    close(our_x_grad, torch_xs.grad.cpu().numpy())
    torch_grads = torch_grads_in_rnnlab_layout("gru" if isinstance(cell, rnnlab.GRU) else "lstm_or_rnn",
                                               module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0,
                                               module.bias_hh_l0)
    for name, grad in torch_grads.items():
        close(grads[name], grad)


@pytest.mark.parametrize("hidden", [16, HIDDEN])
@pytest.mark.parametrize("kind", ["RNN-tanh", "RNN-relu", "RNN-linear", "LSTM", "GRU"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@jax.default_matmul_precision("float32")
def test_pallas_kernels_equal_xla_loops(kind, reverse, hidden, padded, monkeypatch):
    """The Pallas kernels (`rnnlab.native.pallas`, the default on a GPU: the plain RNN's, and the LSTM's and GRU's
    to hidden 64) against the same `rnnlab.scan` with XLA's loops (``RNNLAB_PALLAS=0``), both compiled for this
    GPU: the loss's gradients, and per-example gradients under `jax.vmap` (the batch joins the kernel's rows; W_h's
    gradient per example formed by XLA). Batch 20: padded to two programs of 16 rows; the smallest hidden size the
    kernels take, and the largest at which one program holds the LSTM's W_h; the kernels as by default (each step's
    inputs read one step ahead) and reading them when used (``RNNLAB_PALLAS_AHEAD=0``). Padded: sequences of lengths
    1 to ``SEQ_LEN`` (`lengths`), on the masked kernels."""
    pallas_against_xla_loops(kind, hidden, reverse, padded, monkeypatch, members=1)


@pytest.mark.parametrize(("kind", "hidden"), [("LSTM", 128), ("GRU", 128), ("RNN-tanh", 256), ("RNN-relu", 256)])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@jax.default_matmul_precision("float32")
def test_pallas_teams_equal_xla_loops(kind, hidden, reverse, padded, monkeypatch):
    """The kernels' teams (`rnnlab.native.pallas.team_size`: 4 programs per 16 rows, each holding a quarter of
    W_h's columns and exchanging its units through global memory every step) as the kernels of a single program are
    checked above: the LSTM and GRU at hidden 128, the plain RNN at 256; batch 20, two teams."""
    pallas_against_xla_loops(kind, hidden, reverse, padded, monkeypatch, members=4)


@pytest.mark.parametrize("hidden", [64, 256])
@jax.default_matmul_precision("float32")
def test_pallas_kernels_keep_nans_as_xla_does(hidden, monkeypatch):
    """A NaN in one row's input at one step: the ReLU RNN's Pallas kernels (one program at hidden 64, a team at 256)
    give NaN where XLA's loops do, that row's outputs from that step on and nowhere else (Triton's max, ``maxnumf``,
    would make ReLU(NaN) 0: the kernels write ReLU as a `jnp.where`), and the same input gradient (NaN nowhere: ReLU's
    derivative at a NaN output is 0)."""
    cell = rnnlab.RNN(hidden, activation="relu")
    params = cell.init(jax.random.PRNGKey(2), INPUT_SIZE)
    xs = jax.random.normal(jax.random.PRNGKey(3), (SEQ_LEN, 20, INPUT_SIZE)).at[5, 3, 0].set(jnp.nan)

    def run(pallas_on):
        monkeypatch.setenv("RNNLAB_PALLAS", pallas_on)
        forward = jax.jit(lambda xs: rnnlab.scan(cell, params, xs)[0]).lower(xs)
        assert (forward.as_text().count("xla.gpu.triton") == 1) == (pallas_on == "1")
        if pallas_on == "1":
            assert re.findall(r"grid_x = (\d+)", forward.as_text()) == ["1" if hidden == 64 else "4"]
        grad = jax.jit(jax.grad(lambda xs: jnp.sum(rnnlab.scan(cell, params, xs)[0][:, :4])))
        return np.asarray(forward.compile()(xs)), np.asarray(grad(xs))

    (ys, grad), (xla_ys, xla_grad) = run("1"), run("0")
    assert np.isnan(xla_ys[5:, 3]).all() and np.isnan(xla_ys).sum() == xla_ys[5:, 3].size
    np.testing.assert_array_equal(np.isnan(ys), np.isnan(xla_ys))
    close(ys[~np.isnan(ys)], xla_ys[~np.isnan(xla_ys)])
    close(grad, xla_grad)


def pallas_against_xla_loops(kind, hidden, reverse, padded, monkeypatch, members):
    """The loss's gradients and per-example gradients with the Pallas kernels, ``members`` programs per 16 rows,
    against XLA's loops (see `test_pallas_kernels_equal_xla_loops`)."""
    cell = (rnnlab.RNN(hidden, activation=kind.removeprefix("RNN-")) if kind.startswith("RNN-")
            else getattr(rnnlab, kind)(hidden))
    params = jax.tree_util.tree_map(lambda a: 0.5 * a, cell.init(jax.random.PRNGKey(2), INPUT_SIZE))
    xs = jax.random.normal(jax.random.PRNGKey(3), (SEQ_LEN, 20, INPUT_SIZE))
    weights = jax.random.normal(jax.random.PRNGKey(4), (SEQ_LEN, 20, hidden))
    lengths = jnp.asarray((np.arange(20) * 7) % SEQ_LEN + 1) if padded else None

    def loss(params, xs, weights, lengths=lengths):
        ys, final = rnnlab.scan(cell, params, xs, reverse=reverse, lengths=lengths)
        return jnp.sum(weights * ys) + sum(jnp.sum(jnp.cos(leaf)) for leaf in jax.tree_util.tree_leaves(final))

    def gradients(pallas, ahead="1"):
        monkeypatch.setenv("RNNLAB_PALLAS", pallas)
        monkeypatch.setenv("RNNLAB_PALLAS_AHEAD", ahead)
        # Lowered afresh each time: the variables are read at lowering.
        whole = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs, weights)
        one = lambda p, x, w, n: loss(p, x[:, None], w[:, None], None if n is None else n[None])  # noqa: E731
        per_example = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 1, 1, None if lengths is None else 0)))
        assert (whole.as_text().count("xla.gpu.triton") == 2) == (pallas == "1")
        if pallas == "1":  # programs per 16 rows: the grid's first axis
            assert re.findall(r"grid_x = (\d+)", whole.as_text()) == [str(members)] * 2
        return whole.compile()(params, xs, weights), per_example(params, xs, weights, lengths)

    xla_loops = gradients("0")
    close(gradients("1"), xla_loops)
    close(gradients("1", ahead="0"), xla_loops)  # each step's inputs read when used
