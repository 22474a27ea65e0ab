"""Cells: rnnlab's LSTM, GRU and tanh RNN forward+backward against torch.nn and flax, at the speed issue's shapes.

Each measurement is one training-style call, as each library's users make it:

- rnnlab: ``jax.jit(jax.grad(loss))(params, xs)`` with ``loss = mean(rnnlab.scan(cell, params, xs)[0] ** 2)``,
  time-major ``xs [T, batch, input]``;
- torch: ``module.zero_grad(); ys, _ = module(xs); ys.square().mean().backward()`` with ``torch.nn.LSTM / GRU / RNN``
  (time-major, its default), ``torch.set_num_threads(2)``;
- flax (LSTM only): ``jax.jit(jax.grad(loss))(variables, xs)`` with ``nn.RNN(nn.OptimizedLSTMCell(hidden))``,
  batch-major ``xs [batch, T, input]``, its default.

- jax cuDNN (LSTM, on a GPU only): ``jax.jit(jax.grad(loss))(weights, xs)`` with `jax.experimental.rnn.lstm`,
  its flat cuDNN weights and batch-major ``xs``.

On a GPU torch runs on CUDA (cuDNN), and every library keeps its default precision (TF32 tensor cores allowed in
float32 by JAX's default matmul precision, by ``jax.experimental.rnn`` and by ``torch.backends.cudnn.allow_tf32``);
the targets there are to stay within 1.5x of each cuDNN peer.

Gradients are taken with respect to the parameters only, as in training. The details table also shows rnnlab with
its native kernels off (``RNNLAB_NATIVE=0``: the fused recurrence on XLA alone) on CPU, and on a GPU with its Pallas
kernels off (``RNNLAB_PALLAS=0``) and not reading ahead (``RNNLAB_PALLAS_AHEAD=0``). Every figure is the median of
14 calls after warm-up: 7 rounds in which each library runs a block of 3 calls back to back, the block's first call not
counted (it pays for the previous library's lingering threads: `blocked_medians`), so that a busy machine slows
every library alike and each is measured as its users run it. Also measured in the same
run: a large float32 matmul (this machine's matmul peak: the best of measurements at the start and beside each row)
and the per-step matmul shape inside a `lax.scan`, beside which the achieved GFLOP/s is printed.

    python benchmarks/bench_cells.py            # the issue's four shapes
    python benchmarks/bench_cells.py --quick    # tiny shapes, one call each: checks the code runs
                                                # (or RNNLAB_BENCH_QUICK=1, as `benchmarks/run.py --quick` sets)

Prints a details table, then the targets as a table of rows ``| name | ours | peer | ratio | target | holds |``
(the format `benchmarks/run.py` collects).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp

import rnnlab

GPU = jax.default_backend() == "gpu"
QUICK = "--quick" in sys.argv[1:] or bool(os.environ.get("RNNLAB_BENCH_QUICK"))
#: (batch, T, input, hidden), from the speed issue.
SHAPES = ((5, 4, 3, 8), (3, 6, 4, 16)) if QUICK else ((32, 100, 64, 128), (64, 200, 128, 256), (16, 1000, 32, 128),
                                                      (128, 50, 256, 512))
#: Where the fixed cost per step dominates: rnnlab's LSTM must beat flax by 1.5x there.
STEP_BOUND = SHAPES[0::2]
CELLS = ("LSTM", "GRU", "RNN")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
ROUNDS, BLOCK, WARMUP = (1, 1, 1) if QUICK else (7, 3, 3)
PEAK_SIZE = 256 if QUICK else 8192 if GPU else 2048
TORCH_TARGET, FLAX_TARGET = 1.0, 1.5
#: On a GPU: rnnlab within 1.5x of cuDNN (peer time / rnnlab time >= 1 / 1.5).
CUDNN_TARGET = 1 / 1.5
#: More rnnlab columns, each the same call under other settings (environment variables read while it is lowered):
#: the native kernels off on CPU; on a GPU the Pallas kernels off (XLA's loops, unrolled 8 steps, which the LSTM and
#: GRU run at hidden 256 and 512 anyway, and the plain RNN at 512) and those kernels not reading each step's inputs
#: ahead.
VARIANTS = ({"rnnlab no Pallas": {"RNNLAB_PALLAS": "0"}, "rnnlab not ahead": {"RNNLAB_PALLAS_AHEAD": "0"}} if GPU
            else {"rnnlab XLA only": {"RNNLAB_NATIVE": "0"}})
#: The timed columns of the details table ("jax cuDNN": `jax.experimental.rnn`, which runs on a GPU only).
COLUMNS = ("rnnlab", *VARIANTS, "torch", "flax") + (("jax cuDNN",) if GPU else ())


def _torch():
    import torch

    torch.set_num_threads(2)
    return torch


def _torch_device(torch) -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def rnnlab_problem(kind: str, shape):
    """``(cell, params, xs)``: rnnlab's ``kind`` at ``shape`` (batch, T, input, hidden), its default parameters and
    time-major inputs ``xs [T, batch, input]``."""
    batch, seq_len, input_size, hidden = shape
    cell = getattr(rnnlab, kind)(hidden_size=hidden)
    params = cell.init(jax.random.PRNGKey(0), input_size)
    return cell, params, jax.random.normal(jax.random.PRNGKey(1), (seq_len, batch, input_size))


def rnnlab_call(kind: str, shape, settings: dict | None = None, lengths=None):
    """``settings``: environment variables set while the call is traced and lowered (its first call), e.g.
    ``{"RNNLAB_NATIVE": "0"}``: `rnnlab.native`'s C++ kernels off, i.e. XLA alone, to show what the kernels bring.
    ``lengths [batch]``: padded sequences (`bench_padded.py`), whose padded outputs are zero."""
    cell, params, xs = rnnlab_problem(kind, shape)

    def loss(params, xs):
        ys, _ = rnnlab.scan(cell, params, xs, lengths=lengths)
        return jnp.mean(ys**2)

    grad = jax.jit(jax.grad(loss))

    def call():
        # The settings are read while tracing and lowering (the first call); each jit object keeps its own program.
        with mock.patch.dict(os.environ, settings or {}):
            return jax.block_until_ready(grad(params, xs))

    return call


def torch_module(kind: str, shape):
    """``(torch, module, xs, device)``: ``torch.nn.<kind>`` at ``shape`` on the benchmark's device, and time-major
    inputs."""
    torch = _torch()
    batch, seq_len, input_size, hidden = shape
    device = _torch_device(torch)
    torch.manual_seed(0)
    module = getattr(torch.nn, kind)(input_size, hidden).to(device)
    return torch, module, torch.randn(seq_len, batch, input_size, device=device), device


def torch_call(kind: str, shape, lengths=None):
    """``lengths [batch]``: padded sequences, packed (``pack_padded_sequence(..., enforce_sorted=False)``) and
    unpacked (``pad_packed_sequence``, padded outputs zero), as torch's users run them."""
    torch, module, xs, device = torch_module(kind, shape)
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    seq_len = shape[1]
    cpu_lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.int64)  # packing wants them here

    def call():
        module.zero_grad()
        if lengths is None:
            ys, _ = module(xs)
        else:
            packed, _ = module(pack_padded_sequence(xs, cpu_lengths, enforce_sorted=False))
            ys, _ = pad_packed_sequence(packed, total_length=seq_len)
        ys.square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return call


def flax_call(shape, lengths=None):
    """``lengths [batch]``: padded sequences, as ``seq_lengths``; the padded outputs are masked in the loss."""
    import flax.linen as nn

    batch, seq_len, input_size, hidden = shape
    model = nn.RNN(nn.OptimizedLSTMCell(hidden))
    xs = jax.random.normal(jax.random.PRNGKey(1), (batch, seq_len, input_size))
    variables = model.init(jax.random.PRNGKey(0), xs)

    def loss(variables, xs):
        ys = model.apply(variables, xs, seq_lengths=lengths)
        if lengths is not None:
            ys = jnp.where((jnp.arange(seq_len)[None, :] < lengths[:, None])[..., None], ys, 0.0)
        return jnp.mean(ys**2)

    grad = jax.jit(jax.grad(loss))
    return lambda: jax.block_until_ready(grad(variables, xs))


def jax_cudnn_call(shape):
    """`jax.experimental.rnn.lstm` (cuDNN; GPU only) as its users call it: flat weights, batch-major inputs."""
    from jax.experimental import rnn

    batch, seq_len, input_size, hidden = shape
    weights = rnn.init_lstm_weight(jax.random.PRNGKey(0), input_size, hidden, 1, False)
    xs = jax.random.normal(jax.random.PRNGKey(1), (batch, seq_len, input_size))
    zeros = jnp.zeros((1, batch, hidden))
    seq_lengths = jnp.full((batch,), seq_len, jnp.int32)

    def loss(weights, xs):
        ys, _, _ = rnn.lstm(xs, zeros, zeros, weights, seq_lengths=seq_lengths, input_size=input_size,
                            hidden_size=hidden, num_layers=1, dropout=0.0, bidirectional=False)
        return jnp.mean(ys**2)

    grad = jax.jit(jax.grad(loss))
    return lambda: jax.block_until_ready(grad(weights, xs))


def blocked_medians(calls: dict) -> tuple[dict, dict, dict]:
    """Median and fastest seconds per call of each entry, and the first call's seconds (compile + run).

    Each of `ROUNDS` rounds runs every entry in a block of `BLOCK` calls back to back and keeps all but the block's
    first call; the blocks alternate round by round, so a busy machine slows every library alike. A library's
    threads outlive its call: PyTorch's OpenMP workers keep spinning after a call (still ≥ 50 ms later here), and
    whatever runs next loses a core to them (rnnlab's kernels, which meet at a barrier every step, ran 1.4-1.8x
    slower right after a torch call, while torch ran as fast after rnnlab as alone). The first call of a block pays
    for that; the rest run as each library's users run it, one library at a time. On a shared machine the fastest
    call shows what each library does when it gets the cores."""
    first = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        first[name] = time.perf_counter() - start
        for _ in range(WARMUP - 1):
            call()
    times = {name: [] for name in calls}
    for _ in range(ROUNDS):
        for name, call in calls.items():
            for index in range(BLOCK):
                start = time.perf_counter()
                call()
                if index > 0 or BLOCK == 1:
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return medians, {name: min(ts) for name, ts in times.items()}, first


def _rate(flops: float, call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times) / 1e9


def matmul_peak() -> float:
    """GFLOP/s of a large float32 matmul, ``[n, n] @ [n, n]``: this machine's practical peak."""
    a = jax.random.normal(jax.random.PRNGKey(0), (PEAK_SIZE, PEAK_SIZE))
    matmul = jax.jit(lambda a: a @ a)
    return _rate(2.0 * PEAK_SIZE**3, lambda: jax.block_until_ready(matmul(a)), 5)


def step_matmul_rate(batch: int, hidden: int, gates: int, steps: int = 10 if QUICK else 100) -> float:
    """GFLOP/s of the recurrent matmul ``[batch, H] @ [H, G·H]`` done once per step inside a `lax.scan`."""
    w = jax.random.normal(jax.random.PRNGKey(0), (hidden, gates * hidden)) / hidden**0.5
    h = jax.random.normal(jax.random.PRNGKey(1), (batch, hidden))

    @jax.jit
    def loop(h):
        return jax.lax.scan(lambda h, _: ((h @ w)[:, :hidden], None), h, None, length=steps)[0]

    return _rate(2.0 * batch * hidden * gates * hidden * steps, lambda: jax.block_until_ready(loop(h)), 5)


def train_flops(kind: str, shape) -> float:
    """Matmul FLOPs of one forward+backward with parameter gradients: the recurrent matmul three times per step
    (forward, carry cotangent, weight gradient) and the input projection twice (forward, weight gradient)."""
    batch, seq_len, input_size, hidden = shape
    gate_width = GATES[kind] * hidden
    return 2.0 * seq_len * batch * gate_width * (3 * hidden + 2 * input_size)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _table(header, rows) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def main() -> None:
    torch = _torch()
    peak = matmul_peak()
    print(f"bench_cells: jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({_torch_device(torch)}, {torch.get_num_threads()} threads), {os.cpu_count()} CPU cores"
          + (", QUICK mode" if QUICK else ""))
    print(f"float32 matmul peak ([{PEAK_SIZE}, {PEAK_SIZE}] @ [{PEAK_SIZE}, {PEAK_SIZE}], default precision"
          + (f", {jax.devices()[0].device_kind}: TF32 allowed" if GPU else "") + f"): {peak:.0f} GFLOP/s\n")
    details, targets, compute_bound = [], [], []
    for shape in SHAPES:
        shape_name = ",".join(map(str, shape))
        for kind in CELLS:
            calls = {"rnnlab": rnnlab_call(kind, shape),
                     **{name: rnnlab_call(kind, shape, settings) for name, settings in VARIANTS.items()},
                     "torch": torch_call(kind, shape)}
            if kind == "LSTM":
                calls["flax"] = flax_call(shape)
                if GPU:
                    calls["jax cuDNN"] = jax_cudnn_call(shape)
            medians, fastest, first = blocked_medians(calls)
            gflops = train_flops(kind, shape) / medians["rnnlab"] / 1e9
            step_rate = step_matmul_rate(shape[0], shape[3], GATES[kind])
            # Measured again beside each row: on a shared machine the throughput available changes within a run.
            peak = max(peak, matmul_peak())
            details.append([kind, shape_name] + [
                f"{_ms(medians[name])} ({_ms(fastest[name])})" if name in medians else "—"
                for name in COLUMNS
            ] + [f"{first['rnnlab']:.2f} s", f"{gflops:.0f}", f"{step_rate:.0f}"])
            peers = [(f"torch.nn.{kind}" + (" (cuDNN)" if GPU else ""), "torch")]
            if GPU and kind == "LSTM":
                peers.append(("jax.experimental.rnn (cuDNN)", "jax cuDNN"))
            target = CUDNN_TARGET if GPU else TORCH_TARGET
            for peer_name, peer in peers:
                ratio = medians[peer] / medians["rnnlab"]
                targets.append((f"{kind} {shape_name} vs {peer_name}", _ms(medians["rnnlab"]), _ms(medians[peer]),
                                f"{ratio:.2f}x", f">= {target:.2f}x", "yes" if ratio >= target else "no"))
            if kind == "LSTM" and (shape in STEP_BOUND or GPU):
                # The flax target is a CPU one (fixed cost per step); on a GPU the ratio is printed.
                ratio = medians["flax"] / medians["rnnlab"]
                holds = "info" if GPU else "yes" if ratio >= FLAX_TARGET else "no"
                targets.append((f"LSTM {shape_name} vs flax OptimizedLSTMCell", _ms(medians["rnnlab"]),
                                _ms(medians["flax"]), f"{ratio:.2f}x", "printed" if GPU else f">= {FLAX_TARGET}x",
                                holds))
            if shape not in STEP_BOUND:
                compute_bound.append((len(targets), f"{kind} {shape_name} GFLOP/s vs matmul peak", gflops))
    for index, name, gflops in reversed(compute_bound):
        targets.insert(index, (name, f"{gflops:.0f}", f"{peak:.0f}", f"{gflops / peak:.2f}", "printed", "info"))
    print(f"float32 matmul peak, best over the run: {peak:.0f} GFLOP/s\n")
    _table(("cell", "batch,T,input,hidden", "rnnlab median (fastest)", *COLUMNS[1:], "rnnlab 1st call",
            "rnnlab GFLOP/s", "step-matmul GFLOP/s"), details)
    print()
    _table(("name", "ours", "peer", "ratio", "target", "holds"), targets)


if __name__ == "__main__":
    main()
