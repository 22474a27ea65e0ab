r"""Parameters from and to ``torch.nn`` and ``flax.linen`` recurrent cells.

The one place in rnnlab that knows other libraries' parameter layouts. Each converter returns ``(cell, params)``
(an rnnlab cell and its parameters) that compute the same function as the source, to float32 precision.

rnnlab layouts (`rnnlab.cells`): ``x @ w`` with ``w_x [I, G·H]``, ``w_h [H, G·H]``, gates concatenated on the last
axis, LSTM gates (i, f, g, o) and one bias ``b [4H]``, GRU gates (r, z, n) with ``b_x [3H]`` and ``b_h [3H]``
(``b_hn`` sits inside the reset product, so the GRU keeps two biases).

torch layouts (``torch.nn.RNN/LSTM/GRU`` layer 0, and the ``*Cell`` modules): ``weight_ih [G·H, I]``,
``weight_hh [G·H, H]``, ``bias_ih [G·H]``, ``bias_hh [G·H]``, ``x @ weight.T``, the same gate orders as rnnlab.
So ``w_x = weight_ih.T``, ``w_h = weight_hh.T``; RNN and LSTM ``b = bias_ih + bias_hh``; GRU ``b_x = bias_ih``,
``b_h = bias_hh``.

flax.linen layouts (one ``Dense`` per gate, kernels ``[in, H]``):

- ``SimpleCell``: ``i {kernel [I, H], bias [H]}``, ``h {kernel [H, H]}``.
- ``LSTMCell`` and ``OptimizedLSTMCell``: ``ii, if, ig, io {kernel [I, H]}`` and ``hi, hf, hg, ho {kernel [H, H],
  bias [H]}``; the flax carry is ``(c, h)``, rnnlab's is ``(h, c)``.
- ``GRUCell``: ``ir, iz, in {kernel [I, H], bias [H]}``, ``hr, hz {kernel [H, H]}``, ``hn {kernel [H, H], bias [H]}``.

cuDNN's LSTM as `jax.experimental.rnn.lstm` takes it (one layer, one direction): one flat vector holding torch's
four arrays one after the other, each flattened row-major: ``weight_ih [4H, I]``, ``weight_hh [4H, H]``,
``bias_ih [4H]``, ``bias_hh [4H]``, gates (i, f, g, o).

torch is a development dependency only, so it is imported inside the functions that need it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rnnlab.cells import GRU, LSTM, RNN


def _gated_params(kind: str, w_ih, w_hh, b_ih, b_hh) -> dict[str, jax.Array]:
    """rnnlab parameters from torch-layout arrays (``w_* [G·H, in]``, ``b_* [G·H]``), all already jnp arrays."""
    params = {"w_x": w_ih.T, "w_h": w_hh.T}
    if kind == "gru":
        params["b_x"], params["b_h"] = b_ih, b_hh
    else:
        # Outside the GRU both biases are added to the same pre-activation, so only their sum matters.
        params["b"] = b_ih + b_hh
    return params


def from_torch(module, dtype: Any = jnp.float32):
    """``(cell, params)`` computing what the torch module computes.

    **Arguments:** ``module``: a ``torch.nn.RNN`` (``nonlinearity`` "tanh" or "relu"), ``torch.nn.LSTM`` or
    ``torch.nn.GRU`` with one layer, one direction and no ``proj_size``, or a ``torch.nn.RNNCell``, ``LSTMCell`` or
    ``GRUCell``. ``batch_first`` does not affect the parameters: pass ``time_axis=1`` to `rnnlab.scan` for
    batch-major inputs. Modules built with ``bias=False`` give zero biases. ``dtype``: of the returned parameters.

    **Returns:** ``(cell, params)``, an `rnnlab.RNN`, `rnnlab.LSTM` or `rnnlab.GRU` and its parameters
    (layouts in the module docstring). The torch LSTM carry ``(h, c)`` has the rnnlab order.
    """
    import torch

    kinds = [
        ((torch.nn.LSTM, torch.nn.LSTMCell), "lstm"),
        ((torch.nn.GRU, torch.nn.GRUCell), "gru"),
        ((torch.nn.RNN, torch.nn.RNNCell), "rnn"),
    ]
    kind = next((name for types, name in kinds if isinstance(module, types)), None)
    if kind is None:
        raise TypeError(f"from_torch converts torch.nn.RNN/LSTM/GRU and their *Cell modules; got "
                        f"{type(module).__name__}.")
    if isinstance(module, torch.nn.RNNBase):
        unsupported = {
            "num_layers": (module.num_layers, 1),
            "bidirectional": (module.bidirectional, False),
            "proj_size": (getattr(module, "proj_size", 0), 0),
        }
        for option, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"from_torch converts one-layer, one-direction modules without projection; got "
                                 f"{option}={value}. Build an rnnlab.Stack from one from_torch per layer instead.")
        suffix = "_l0"
    else:
        suffix = ""

    def array(name):
        return jnp.asarray(getattr(module, name + suffix).detach().cpu().numpy(), dtype)

    w_ih, w_hh = array("weight_ih"), array("weight_hh")
    zeros = jnp.zeros((w_ih.shape[0],), dtype)
    b_ih = array("bias_ih") if module.bias else zeros
    b_hh = array("bias_hh") if module.bias else zeros
    hidden_size = module.hidden_size
    if kind == "lstm":
        cell = LSTM(hidden_size=hidden_size)
    elif kind == "gru":
        cell = GRU(hidden_size=hidden_size)
    else:
        cell = RNN(hidden_size=hidden_size, activation=module.nonlinearity)
    return cell, _gated_params(kind, w_ih, w_hh, b_ih, b_hh)


def to_torch(cell, params):
    """A one-layer ``torch.nn.RNN``, ``LSTM`` or ``GRU`` (``batch_first=False``) computing what ``cell`` computes.

    **Arguments:** ``cell``: an `rnnlab.RNN` (activation "tanh" or "relu", the two torch has), `rnnlab.LSTM` or
    `rnnlab.GRU`; ``params``: its parameters. The module gets the parameters' dtype.

    **Returns:** the torch module. ``weight_ih_l0 = w_x.T``, ``weight_hh_l0 = w_h.T``; for the RNN and the LSTM
    ``bias_ih_l0 = b`` and ``bias_hh_l0 = 0`` (torch keeps two biases where one suffices); for the GRU
    ``bias_ih_l0 = b_x`` and ``bias_hh_l0 = b_h``.
    """
    import torch

    if isinstance(cell, LSTM):
        module_type, kwargs = torch.nn.LSTM, {}
    elif isinstance(cell, GRU):
        module_type, kwargs = torch.nn.GRU, {}
    elif isinstance(cell, RNN):
        if cell.activation not in ("tanh", "relu"):
            raise ValueError(f"torch.nn.RNN has the activations 'tanh' and 'relu'; this RNN has {cell.activation!r}.")
        module_type, kwargs = torch.nn.RNN, {"nonlinearity": cell.activation}
    else:
        raise TypeError(f"to_torch converts rnnlab.RNN, LSTM and GRU; got {type(cell).__name__}.")

    def tensor(array):
        return torch.from_numpy(np.array(array))

    w_x = tensor(params["w_x"])
    module = module_type(w_x.shape[0], cell.hidden_size, dtype=w_x.dtype, **kwargs)
    b_ih, b_hh = (params["b_x"], params["b_h"]) if isinstance(cell, GRU) else (params["b"], jnp.zeros_like(params["b"]))
    with torch.no_grad():
        module.weight_ih_l0.copy_(w_x.T)
        module.weight_hh_l0.copy_(tensor(params["w_h"]).T)
        module.bias_ih_l0.copy_(tensor(b_ih))
        module.bias_hh_l0.copy_(tensor(b_hh))
    return module


def to_cudnn_lstm(cell, params) -> jax.Array:
    """The flat weight vector with which `jax.experimental.rnn.lstm` (cuDNN) computes what an `rnnlab.LSTM` computes.

    **Arguments:** ``cell``: an `rnnlab.LSTM`; ``params``: its parameters (``w_x [I, 4H]``, ``w_h [H, 4H]``,
    ``b [4H]``).

    **Returns:** ``weights [4H·(I + H + 2)]``, with ``bias_ih = b`` and ``bias_hh = 0``. Built from ``params`` by
    transposes and concatenation, so gradients flow back to them. Pass ``input_size=I, hidden_size=H,
    num_layers=1, bidirectional=False`` to `jax.experimental.rnn.lstm`, whose inputs are batch-major.
    """
    if type(cell) is not LSTM:
        raise TypeError(f"to_cudnn_lstm converts an rnnlab.LSTM; got {type(cell).__name__}.")
    bias = params["b"]
    return jnp.concatenate([params["w_x"].T.ravel(), params["w_h"].T.ravel(), bias, jnp.zeros_like(bias)])


def from_cudnn_lstm(weights, input_size: int, hidden_size: int, dtype: Any = jnp.float32):
    """``(cell, params)`` computing what `jax.experimental.rnn.lstm` computes with the flat ``weights`` of a
    one-layer, one-direction LSTM (``weights [4H·(I + H + 2)]``, e.g. from ``jax.experimental.rnn.init_lstm_weight``).
    """
    gates = 4 * hidden_size
    sizes = (gates * input_size, gates * hidden_size, gates, gates)
    weights = jnp.asarray(weights, dtype)
    if weights.shape != (sum(sizes),):
        raise ValueError(f"weights has shape {weights.shape}; a one-layer, one-direction cuDNN LSTM with "
                         f"input_size={input_size}, hidden_size={hidden_size} has ({sum(sizes)},).")
    w_ih, w_hh, b_ih, b_hh = jnp.split(weights, np.cumsum(sizes)[:-1])
    return LSTM(hidden_size=hidden_size), _gated_params(
        "lstm", w_ih.reshape(gates, input_size), w_hh.reshape(gates, hidden_size), b_ih, b_hh)


def _check_gate_functions(flax_cell) -> None:
    """Raise unless a gated flax cell uses sigmoid gates and tanh activations, the only ones rnnlab's cells compute."""
    for field, standard in (("gate_fn", jax.nn.sigmoid), ("activation_fn", jnp.tanh)):
        fn = getattr(flax_cell, field)
        if fn is not standard:
            raise ValueError(f"{type(flax_cell).__name__}.{field} is {fn!r}; rnnlab's {type(flax_cell).__name__} "
                             f"equivalent computes only {standard.__name__} there.")


def from_flax(flax_cell, cell_params, dtype: Any = jnp.float32):
    """``(cell, params)`` computing what a ``flax.linen`` recurrent cell computes.

    **Arguments:** ``flax_cell``: a ``flax.linen`` ``SimpleCell`` (``residual=False``), ``LSTMCell``,
    ``OptimizedLSTMCell`` or ``GRUCell`` with the standard ``gate_fn`` (sigmoid) and ``activation_fn`` (tanh); a
    ``SimpleCell`` may have any ``activation_fn`` (tanh, relu and identity map to rnnlab's names, another callable
    is kept as is). ``cell_params``: its variables, ``{"params": {...}}`` or the inner dict. ``dtype``: of the
    returned parameters.

    **Returns:** ``(cell, params)`` (layouts in the module docstring). Note the carry order: flax's LSTM carry is
    ``(c, h)``, rnnlab's is ``(h, c)``.
    """
    import flax.linen as nn

    params = cell_params["params"] if "params" in cell_params else cell_params
    name = type(flax_cell).__name__

    def array(*path):
        value = params
        for key in path:
            value = value[key]
        return jnp.asarray(value, dtype)

    if isinstance(flax_cell, nn.SimpleCell):
        if flax_cell.residual:
            raise ValueError("from_flax: SimpleCell(residual=True) adds h before the activation; rnnlab.RNN has no "
                             "such term. Define a cell of your own for it.")
        names = {jnp.tanh: "tanh", jax.nn.relu: "relu", jax.nn.identity: "linear"}
        activation = names.get(flax_cell.activation_fn, flax_cell.activation_fn)
        cell = RNN(hidden_size=flax_cell.features, activation=activation)
        return cell, {"w_x": array("i", "kernel"), "w_h": array("h", "kernel"), "b": array("i", "bias")}
    if isinstance(flax_cell, (nn.LSTMCell, nn.OptimizedLSTMCell)):
        _check_gate_functions(flax_cell)
        gates = "ifgo"
        return LSTM(hidden_size=flax_cell.features), {
            "w_x": jnp.concatenate([array("i" + g, "kernel") for g in gates], axis=1),
            "w_h": jnp.concatenate([array("h" + g, "kernel") for g in gates], axis=1),
            "b": jnp.concatenate([array("h" + g, "bias") for g in gates]),
        }
    if isinstance(flax_cell, nn.GRUCell):
        _check_gate_functions(flax_cell)
        gates = "rzn"
        # flax has no recurrent bias on r and z (the input bias covers them), but needs one on n, inside r·(...).
        no_bias = jnp.zeros((flax_cell.features,), dtype)
        return GRU(hidden_size=flax_cell.features), {
            "w_x": jnp.concatenate([array("i" + g, "kernel") for g in gates], axis=1),
            "w_h": jnp.concatenate([array("h" + g, "kernel") for g in gates], axis=1),
            "b_x": jnp.concatenate([array("i" + g, "bias") for g in gates]),
            "b_h": jnp.concatenate([no_bias, no_bias, array("hn", "bias")]),
        }
    raise TypeError(f"from_flax converts flax.linen SimpleCell, LSTMCell, OptimizedLSTMCell and GRUCell; got {name}.")
