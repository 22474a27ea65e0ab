"""The forward pass alone (evaluation, inference): rnnlab's LSTM, GRU and tanh RNN against torch.nn and flax, at the
speed issue's shapes.

Each measurement is one call of the forward pass, as each library's users make it when nothing is differentiated:

- rnnlab: ``jax.jit(lambda params, xs: rnnlab.scan(cell, params, xs)[0])``, time-major ``xs [T, batch, input]``.
  The LSTM runs `rnnlab.native.lstm_infer_p` there (on a CPU its kernel projects each step's input in the loop and
  keeps no gates); the column "rnnlab keeping gates" is the same call on the path a differentiated scan takes
  (`rnnlab.fused.recurrence` on the inputs projected for all steps), what every call ran before;
- torch: ``with torch.no_grad(): module(xs)`` with ``torch.nn.LSTM / GRU / RNN``, ``torch.set_num_threads(2)``;
- flax (LSTM only): ``jax.jit(model.apply)(variables, xs)`` with ``nn.RNN(nn.OptimizedLSTMCell(hidden))``,
  batch-major ``xs``.

No target of the speed issue is a forward pass alone, so the ratios are printed (``info``). Timing as in
`bench_cells.py` (`blocked_medians`: medians of 14 calls in alternating blocks).

    python benchmarks/bench_forward.py            # the issue's four shapes
    python benchmarks/bench_forward.py --quick    # tiny shapes, one call each
"""

from __future__ import annotations

import jax
from bench_cells import (CELLS, SHAPES, _ms, _table, _torch, _torch_device, blocked_medians, rnnlab_problem,
                         torch_module)

import rnnlab
from rnnlab import fused

GPU = jax.default_backend() == "gpu"


def rnnlab_call(kind: str, shape):
    cell, params, xs = rnnlab_problem(kind, shape)
    forward = jax.jit(lambda params, xs: rnnlab.scan(cell, params, xs)[0])
    return lambda: jax.block_until_ready(forward(params, xs))


def rnnlab_keeping_gates_call(kind: str, shape):
    """The forward pass a differentiated `rnnlab.scan` runs: the inputs projected for all steps, then the forward
    kernel that keeps what the backward pass needs."""
    cell, params, xs = rnnlab_problem(kind, shape)

    def forward(params, xs):
        projected = fused.over_steps(lambda x: cell.project_inputs(params, x), xs)
        return fused.recurrence(cell, params, cell.initial_carry(xs.shape[1:2]), projected)[1]

    forward = jax.jit(forward)
    return lambda: jax.block_until_ready(forward(params, xs))


def torch_call(kind: str, shape):
    torch, module, xs, device = torch_module(kind, shape)

    def call():
        with torch.no_grad():
            module(xs)
        if device == "cuda":
            torch.cuda.synchronize()

    return call


def flax_call(shape):
    import flax.linen as nn

    batch, seq_len, input_size, hidden = shape
    model = nn.RNN(nn.OptimizedLSTMCell(hidden))
    xs = jax.random.normal(jax.random.PRNGKey(1), (batch, seq_len, input_size))
    variables = model.init(jax.random.PRNGKey(0), xs)
    forward = jax.jit(model.apply)
    return lambda: jax.block_until_ready(forward(variables, xs))


def main() -> None:
    torch = _torch()
    print(f"bench_forward: jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({_torch_device(torch)}, {torch.get_num_threads()} threads)\n")
    columns = ("rnnlab", "rnnlab keeping gates", "torch", "flax")
    details, rows = [], []
    for shape in SHAPES:
        shape_name = ",".join(map(str, shape))
        for kind in CELLS:
            calls = {"rnnlab": rnnlab_call(kind, shape), "rnnlab keeping gates": rnnlab_keeping_gates_call(kind, shape),
                     "torch": torch_call(kind, shape)}
            if kind == "LSTM":
                calls["flax"] = flax_call(shape)
            medians, fastest, _ = blocked_medians(calls)
            details.append([kind, shape_name] + [f"{_ms(medians[name])} ({_ms(fastest[name])})" if name in medians
                                                 else "—" for name in columns])
            peers = [("torch.nn." + kind + (" (cuDNN)" if GPU else ""), "torch")]
            peers += [("flax OptimizedLSTMCell", "flax")] if kind == "LSTM" else []
            for peer_name, peer in peers:
                rows.append((f"{kind} {shape_name} forward alone vs {peer_name}", _ms(medians["rnnlab"]),
                             _ms(medians[peer]), f"{medians[peer] / medians['rnnlab']:.2f}x", "printed", "info"))
    _table(("cell", "batch,T,input,hidden", "rnnlab median (fastest)", *columns[1:]), details)
    print()
    _table(("name", "ours", "peer", "ratio", "target", "holds"), rows)


if __name__ == "__main__":
    main()
