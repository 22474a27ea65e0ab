"""`rnnlab.interop`: with the same weights, rnnlab computes what torch and flax compute, outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import flax.linen as nn

import rnnlab
from rnnlab import interop

INPUT_SIZE, HIDDEN, SEQ_LEN, BATCH = 3, 5, 6, 2
# float32 through a few steps of matmuls: relative agreement to a few ulps of the largest values.
RTOL, ATOL = 1e-5, 1e-6


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


def inputs_and_carry(is_lstm, seed=0):
    """Inputs ``[T, B, I]`` and a non-zero initial carry ``h [B, H]`` (and ``c`` for the LSTM), as numpy."""
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((SEQ_LEN, BATCH, INPUT_SIZE)).astype(np.float32)
    h0 = 0.5 * rng.standard_normal((BATCH, HIDDEN)).astype(np.float32)
    c0 = 0.5 * rng.standard_normal((BATCH, HIDDEN)).astype(np.float32)
    return xs, ((h0, c0) if is_lstm else h0)


def output_weights(shape):
    """Fixed distinct weights so the loss ``sum(ys * w)`` reaches every output."""
    return np.cos(np.arange(np.prod(shape), dtype=np.float32)).reshape(shape)


def rnnlab_loss_and_grads(cell, params, xs, carry):
    def loss(params, xs):
        ys, final = rnnlab.scan(cell, params, xs, carry=carry)
        return jnp.sum(ys * output_weights(ys.shape)), (ys, final)

    return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, jnp.asarray(xs))


# ---- torch ----

TORCH_MODULES = {
    "rnn_tanh": lambda **kw: torch.nn.RNN(INPUT_SIZE, HIDDEN, **kw),
    "rnn_relu": lambda **kw: torch.nn.RNN(INPUT_SIZE, HIDDEN, nonlinearity="relu", **kw),
    "lstm": lambda **kw: torch.nn.LSTM(INPUT_SIZE, HIDDEN, **kw),
    "gru": lambda **kw: torch.nn.GRU(INPUT_SIZE, HIDDEN, **kw),
}
TORCH_CELLS = {
    "rnn_tanh": lambda **kw: torch.nn.RNNCell(INPUT_SIZE, HIDDEN, **kw),
    "rnn_relu": lambda **kw: torch.nn.RNNCell(INPUT_SIZE, HIDDEN, nonlinearity="relu", **kw),
    "lstm": lambda **kw: torch.nn.LSTMCell(INPUT_SIZE, HIDDEN, **kw),
    "gru": lambda **kw: torch.nn.GRUCell(INPUT_SIZE, HIDDEN, **kw),
}


def torch_grads_in_rnnlab_layout(kind, weight_ih, weight_hh, bias_ih, bias_hh):
    """torch's parameter gradients laid out as rnnlab's (``w = weight.T``; the LSTM/RNN ``b`` gets the gradient of
    either torch bias, since both enter the same sum)."""
    grads = {"w_x": weight_ih.grad.cpu().numpy().T, "w_h": weight_hh.grad.cpu().numpy().T}
    if bias_ih is not None:
        if kind == "gru":
            grads["b_x"], grads["b_h"] = bias_ih.grad.cpu().numpy(), bias_hh.grad.cpu().numpy()
        else:
            grads["b"] = bias_ih.grad.cpu().numpy()
    return grads


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("kind", list(TORCH_MODULES))
def test_from_torch_layer_matches_torch_outputs_and_gradients(kind, batch_first, bias):
    torch.manual_seed(0)
    module = TORCH_MODULES[kind](bias=bias, batch_first=batch_first)
    cell, params = interop.from_torch(module)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
    xs, carry = inputs_and_carry(kind == "lstm")

    time_axis = 1 if batch_first else 0
    x_torch = torch.tensor(np.moveaxis(xs, 0, time_axis), requires_grad=True)
    torch_carry = tuple(torch.tensor(a[None]) for a in carry) if kind == "lstm" else torch.tensor(carry[None])
    out, final_torch = module(x_torch, torch_carry)
    (out * torch.tensor(output_weights(out.shape))).sum().backward()

    def loss(params, xs_batch):
        ys, final = rnnlab.scan(cell, params, xs_batch, carry=jax.tree_util.tree_map(jnp.asarray, carry),
                                time_axis=time_axis)
        return jnp.sum(ys * output_weights(ys.shape)), (ys, final)

    (grad_params, grad_xs), (ys, final) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
        params, jnp.asarray(x_torch.detach().numpy()))
    close(ys, out.detach().numpy())
    finals_torch = final_torch if kind == "lstm" else (final_torch,)
    for ours, theirs in zip(jax.tree_util.tree_leaves(final), finals_torch):
        close(ours, theirs.detach().numpy()[0])
    close(grad_xs, x_torch.grad.numpy())
    torch_grads = torch_grads_in_rnnlab_layout(kind, module.weight_ih_l0, module.weight_hh_l0,
                                               getattr(module, "bias_ih_l0", None), getattr(module, "bias_hh_l0", None))
    for name, grad in torch_grads.items():
        close(grad_params[name], grad, rtol=1e-4, atol=1e-5)
    if not bias:
        assert all(np.all(np.asarray(params[name]) == 0) for name in params if name.startswith("b"))


@pytest.mark.parametrize("kind", list(TORCH_CELLS))
def test_from_torch_cell_matches_a_torch_loop(kind):
    torch.manual_seed(1)
    module = TORCH_CELLS[kind]()
    cell, params = interop.from_torch(module)
    xs, carry = inputs_and_carry(kind == "lstm", seed=1)
    x_torch = torch.tensor(xs, requires_grad=True)
    state = tuple(map(torch.tensor, carry)) if kind == "lstm" else torch.tensor(carry)
    outs = []
    for t in range(SEQ_LEN):
        state = module(x_torch[t], state)
        outs.append(state[0] if kind == "lstm" else state)
    out = torch.stack(outs)
    (out * torch.tensor(output_weights(out.shape))).sum().backward()

    carry = jax.tree_util.tree_map(jnp.asarray, carry)
    (grad_params, grad_xs), (ys, final) = rnnlab_loss_and_grads(cell, params, xs, carry)
    close(ys, out.detach().numpy())
    for ours, theirs in zip(jax.tree_util.tree_leaves(final), state if kind == "lstm" else (state,)):
        close(ours, theirs.detach().numpy())
    close(grad_xs, x_torch.grad.numpy())
    torch_grads = torch_grads_in_rnnlab_layout(kind, module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh)
    for name, grad in torch_grads.items():
        close(grad_params[name], grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "cell", [rnnlab.RNN(HIDDEN), rnnlab.RNN(HIDDEN, activation="relu"), rnnlab.LSTM(HIDDEN), rnnlab.GRU(HIDDEN)],
    ids=["rnn_tanh", "rnn_relu", "lstm", "gru"],
)
def test_to_torch_computes_the_same_and_round_trips(cell):
    params = cell.init(jax.random.PRNGKey(0), INPUT_SIZE)
    params = jax.tree_util.tree_map(lambda a: a + 0.1, params)  # non-zero in every bias, including GRU's b_h
    module = interop.to_torch(cell, params)
    assert module.num_layers == 1 and not module.batch_first
    xs, _ = inputs_and_carry(isinstance(cell, rnnlab.LSTM))
    ys, _ = rnnlab.scan(cell, params, xs)
    close(ys, module(torch.tensor(xs))[0].detach().numpy())
    cell_back, params_back = interop.from_torch(module)
    assert cell_back == cell
    jax.tree_util.tree_map(close, params_back, params)


def test_to_torch_keeps_float64():
    with jax.enable_x64(True):
        cell = rnnlab.GRU(HIDDEN)
        params = cell.init(jax.random.PRNGKey(0), INPUT_SIZE, jnp.float64)
        module = interop.to_torch(cell, params)
        assert module.weight_ih_l0.dtype == torch.float64
        xs = np.random.default_rng(0).standard_normal((SEQ_LEN, BATCH, INPUT_SIZE))
        close(rnnlab.scan(cell, params, xs)[0], module(torch.tensor(xs))[0].detach().numpy(), rtol=1e-12, atol=1e-14)


def test_stack_matches_two_layer_bidirectional_torch_lstm_with_lengths():
    """rnnlab.Stack against torch.nn.LSTM(num_layers=2, bidirectional=True) on packed variable-length sequences."""
    stack = rnnlab.Stack.repeat(rnnlab.LSTM(HIDDEN), 2, bidirectional=True)
    params = stack.init(jax.random.PRNGKey(0), INPUT_SIZE)
    module = torch.nn.LSTM(INPUT_SIZE, HIDDEN, num_layers=2, bidirectional=True)
    with torch.no_grad():
        for layer, layer_params in enumerate(params):
            for direction, suffix in (("forward", ""), ("backward", "_reverse")):
                p = layer_params[direction]
                getattr(module, f"weight_ih_l{layer}{suffix}").copy_(torch.tensor(np.asarray(p["w_x"]).T))
                getattr(module, f"weight_hh_l{layer}{suffix}").copy_(torch.tensor(np.asarray(p["w_h"]).T))
                getattr(module, f"bias_ih_l{layer}{suffix}").copy_(torch.tensor(np.asarray(p["b"])))
                getattr(module, f"bias_hh_l{layer}{suffix}").zero_()
    xs = np.random.default_rng(0).standard_normal((SEQ_LEN, 3, INPUT_SIZE)).astype(np.float32)
    lengths = np.array([6, 2, 4])
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.tensor(xs), torch.tensor(lengths), enforce_sorted=False)
    out_packed, (h_n, c_n) = module(packed)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out_packed, total_length=SEQ_LEN)

    ys, finals = stack(params, xs, lengths=lengths)
    close(ys, out.detach().numpy())
    # torch orders h_n as (layer 0 forward, layer 0 backward, layer 1 forward, layer 1 backward).
    ours = [carry for layer in finals for carry in layer]
    close(np.stack([h for h, _ in ours]), h_n.detach().numpy())
    close(np.stack([c for _, c in ours]), c_n.detach().numpy())


@pytest.mark.parametrize(
    "module, message",
    [
        (torch.nn.LSTM(INPUT_SIZE, HIDDEN, num_layers=2), r"num_layers=2"),
        (torch.nn.GRU(INPUT_SIZE, HIDDEN, bidirectional=True), r"bidirectional=True"),
        (torch.nn.LSTM(INPUT_SIZE, HIDDEN, proj_size=2), r"proj_size=2"),
    ],
    ids=["num_layers", "bidirectional", "proj_size"],
)
def test_from_torch_rejects_what_one_cell_cannot_hold(module, message):
    with pytest.raises(ValueError, match=message):
        interop.from_torch(module)


def test_conversions_reject_unknown_types():
    with pytest.raises(TypeError, match=r"got Linear"):
        interop.from_torch(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"activations 'tanh' and 'relu'.*'linear'"):
        interop.to_torch(rnnlab.RNN(HIDDEN, activation="linear"), rnnlab.RNN(HIDDEN).init(jax.random.PRNGKey(0), 3))
    stack = rnnlab.Stack.repeat(rnnlab.LSTM(HIDDEN), 2)
    with pytest.raises(TypeError, match=r"got Stack"):
        interop.to_torch(stack, stack.init(jax.random.PRNGKey(0), 3))
    with pytest.raises(TypeError, match=r"got MGUCell"):
        interop.from_flax(nn.MGUCell(HIDDEN), {})


# ---- flax ----

FLAX_CELLS = {
    "simple_tanh": nn.SimpleCell(HIDDEN),
    "simple_relu": nn.SimpleCell(HIDDEN, activation_fn=nn.relu),
    "simple_identity": nn.SimpleCell(HIDDEN, activation_fn=jax.nn.identity),
    "simple_gelu_callable": nn.SimpleCell(HIDDEN, activation_fn=jax.nn.gelu),
    "lstm": nn.LSTMCell(HIDDEN),
    "optimized_lstm": nn.OptimizedLSTMCell(HIDDEN),
    "gru": nn.GRUCell(HIDDEN),
}


@pytest.mark.parametrize("wrapped", [True, False], ids=["variables", "inner_params"])
@pytest.mark.parametrize("name", list(FLAX_CELLS))
def test_from_flax_matches_flax_outputs_and_gradients(name, wrapped):
    """Outputs, final carry and gradients (w.r.t. inputs and flax's own parameters, through from_flax) agree."""
    flax_cell = FLAX_CELLS[name]
    xs, _ = inputs_and_carry(False)
    key = jax.random.PRNGKey(0)
    carry0 = flax_cell.initialize_carry(key, xs[0].shape)
    # Non-zero biases and carry, so a misplaced bias or a swapped (c, h) cannot hide.
    variables = jax.tree_util.tree_map(lambda a: a + 0.1, flax_cell.init(key, carry0, xs[0]))
    carry0 = jax.tree_util.tree_map(lambda a: a + 0.3 * jnp.arange(a.size).reshape(a.shape) / a.size, carry0)

    def flax_loss(variables, xs):
        carry, ys = carry0, []
        for t in range(SEQ_LEN):
            carry, y = flax_cell.apply(variables, carry, xs[t])
            ys.append(y)
        ys = jnp.stack(ys)
        return jnp.sum(ys * output_weights(ys.shape)), (ys, carry)

    def rnnlab_loss(variables, xs):
        cell, params = interop.from_flax(flax_cell, variables if wrapped else variables["params"])
        # flax's LSTM carry is (c, h); rnnlab's is (h, c).
        carry = carry0[::-1] if isinstance(carry0, tuple) else carry0
        ys, final = rnnlab.scan(cell, params, xs, carry=carry)
        return jnp.sum(ys * output_weights(ys.shape)), (ys, final[::-1] if isinstance(final, tuple) else final)

    expected = jax.grad(flax_loss, argnums=(0, 1), has_aux=True)(variables, jnp.asarray(xs))
    actual = jax.grad(rnnlab_loss, argnums=(0, 1), has_aux=True)(variables, jnp.asarray(xs))
    jax.tree_util.tree_map(close, actual, expected)


def test_from_flax_maps_activation_names():
    for flax_cell, activation in [(FLAX_CELLS["simple_tanh"], "tanh"), (FLAX_CELLS["simple_relu"], "relu"),
                                  (FLAX_CELLS["simple_identity"], "linear")]:
        variables = flax_cell.init(jax.random.PRNGKey(0), jnp.zeros(HIDDEN), jnp.zeros(INPUT_SIZE))
        cell, _ = interop.from_flax(flax_cell, variables)
        assert cell == rnnlab.RNN(HIDDEN, activation=activation)


@pytest.mark.parametrize(
    "flax_cell, message",
    [
        (nn.SimpleCell(HIDDEN, residual=True), r"residual=True"),
        (nn.LSTMCell(HIDDEN, gate_fn=jax.nn.hard_sigmoid), r"LSTMCell.gate_fn.*sigmoid"),
        (nn.OptimizedLSTMCell(HIDDEN, activation_fn=jax.nn.relu), r"OptimizedLSTMCell.activation_fn.*tanh"),
        (nn.GRUCell(HIDDEN, activation_fn=jax.nn.soft_sign), r"GRUCell.activation_fn.*tanh"),
    ],
    ids=["residual", "lstm_gate_fn", "optimized_lstm_activation_fn", "gru_activation_fn"],
)
def test_from_flax_rejects_what_rnnlab_cells_do_not_compute(flax_cell, message):
    carry = flax_cell.initialize_carry(jax.random.PRNGKey(0), (INPUT_SIZE,))
    variables = flax_cell.init(jax.random.PRNGKey(0), carry, jnp.zeros(INPUT_SIZE))
    with pytest.raises(ValueError, match=message):
        interop.from_flax(flax_cell, variables)


# ---- cuDNN's flat LSTM weights (jax.experimental.rnn) ----


def lstm_ref_loss(weights, xs, carry):
    """``jax.experimental.rnn.lstm_ref`` (JAX's own pure-JAX reference of its cuDNN LSTM) on time-major ``xs``, the
    same loss as `rnnlab_loss_and_grads`."""
    from jax.experimental import rnn

    h0, c0 = (jnp.asarray(a)[None] for a in carry)
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(weights, INPUT_SIZE, HIDDEN, 1, False)
    ys, h_n, c_n = rnn.lstm_ref(jnp.swapaxes(xs, 0, 1), h0, c0, w_ih, w_hh, b_ih, b_hh,
                                seq_lengths=jnp.full((BATCH,), SEQ_LEN, jnp.int32), input_size=INPUT_SIZE,
                                hidden_size=HIDDEN, num_layers=1, dropout=0.0, bidirectional=False)
    ys = jnp.swapaxes(ys, 0, 1)
    return jnp.sum(ys * output_weights(ys.shape)), (ys, (h_n[0], c_n[0]))


def test_cudnn_lstm_weights_compute_what_jax_reference_lstm_computes():
    from jax.experimental import rnn

    weights = rnn.init_lstm_weight(jax.random.PRNGKey(3), INPUT_SIZE, HIDDEN, 1, False)
    xs, carry = inputs_and_carry(is_lstm=True)
    cell, params = interop.from_cudnn_lstm(weights, INPUT_SIZE, HIDDEN)
    (grads, x_grad), (ys, final) = rnnlab_loss_and_grads(cell, params, xs, carry)
    (ref_w_grad, ref_x_grad), (ref_ys, ref_final) = jax.grad(lstm_ref_loss, argnums=(0, 1), has_aux=True)(
        weights, jnp.asarray(xs), carry)
    close(ys, ref_ys)
    jax.tree_util.tree_map(close, final, ref_final)
    close(x_grad, ref_x_grad)
    # Back through the conversion, rnnlab's gradients land where cuDNN's layout has them.
    pulled_back = jax.vjp(lambda p: interop.to_cudnn_lstm(cell, p), params)[1](ref_w_grad)[0]
    jax.tree_util.tree_map(close, grads, pulled_back)
    round_trip = interop.to_cudnn_lstm(*interop.from_cudnn_lstm(interop.to_cudnn_lstm(cell, params), INPUT_SIZE,
                                                                HIDDEN))
    close(round_trip, interop.to_cudnn_lstm(cell, params))


def test_cudnn_lstm_conversions_reject_other_cells_and_sizes():
    with pytest.raises(TypeError, match="to_cudnn_lstm converts an rnnlab.LSTM; got GRU"):
        interop.to_cudnn_lstm(rnnlab.GRU(4), rnnlab.GRU(4).init(jax.random.PRNGKey(0), 3))
    with pytest.raises(ValueError, match=r"weights has shape \(10,\).*input_size=3, hidden_size=5 has \(200,\)"):
        interop.from_cudnn_lstm(jnp.zeros(10), 3, 5)
