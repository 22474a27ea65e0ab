"""Native CPU kernels for the sequential loops of the LSTM, the GRU and the Elman RNN, behind `rnnlab.scan` (used by
`rnnlab.fused`).

XLA runs the per-step matmul of a recurrence on one core, so on a CPU the loops of an LSTM or a GRU use one core
however many there are. ``recurrent.cc`` holds each cell's forward loop and backward (transposed tangent) loop as XLA
FFI custom calls on XLA's intra-op thread pool: from 8 rows a thread each thread runs whole groups of rows, with no
barrier (`cell_split`); with fewer, the threads split the hidden units and meet at a barrier every step.

Three JAX primitives per cell carry them, so that they compose with `jit`, `vmap`, `grad`, `jvp` and
`jax.hessian`:

- ``lstm_forward_p(w_h, h0, c0, px) -> (hs, cs, gates)`` and ``gru_forward_p(w_h, b_h, h0, px) -> (hs, gates,
  a_n)``: the recurrence, saving what the tangent's coefficients need;
- ``lstm_tangent_p(w_h, gates, cs, c0, hs, h0, u, dw, dh0, dc0) -> (dhs, dh, dc)`` and
  ``gru_tangent_p(w_h, gates, a_n, hs, h0, u, dw, dh0) -> (dhs, dh)``: the tangent, linear in ``u`` (the
  pre-activation tangent from the inputs), ``dw`` (the recurrent weights' tangent: Ẇ_h, the GRU's with ḃ_h as one
  more row) and the carry's tangent;
- ``lstm_backward_p`` and ``gru_backward_p``: the tangent's transpose, which is what `jax.grad` runs (the GRU's
  forms b_h's gradient with W_h's, as its last row: XLA then never slices the reset gate out of the saved gates,
  which cost a copy of them);
- ``lstm_forward_inputs_p(w_h, w_x, b, h0, c0, xs) -> (hs, cs, gates)``: ``lstm_forward_p`` on ``xs @ w_x + b``
  with each step's input projected in the loop (one matmul of ``[h_{t-1}, x_t]`` by ``[W_h; W_x]``), no projection
  of every step written to memory: what a differentiated `rnnlab.scan` of an LSTM runs (`rnnlab.fused`); and
  ``lstm_infer_p(w_h, w_x, b, h0, c0, xs) -> (hs, c)``, the same for a recurrence nothing differentiates, keeping
  nothing but the outputs and the final cell state; ``gru_forward_inputs_p(w_h, b_h, w_x, b_x, h0, xs) -> (hs,
  gates, a_n)``, the GRU's (its inputs projected in a matmul of their own each step: its n gate takes ``h W_hn``
  alone), for the GRU's forward pass differentiated or not;
- ``rnn_forward_p``, ``rnn_tangent_p`` and ``rnn_backward_p`` likewise for `rnnlab.RNN` with a named activation
  (``tanh``, ``relu``, ``linear``; the tangent's coefficients come from ``hs`` alone);
- a masked twin of each (``lstm_forward_masked_p`` and so on) for padded sequences (`rnnlab.scan` with
  ``lengths``): one more operand, ``valid [T, B]`` booleans, after the forward primitive's operands and after the
  others' residuals. At an invalid step a row keeps its carry (so ``hs`` holds carries, not the zeroed outputs) and
  the backward pass hands the carry's cotangent through it unchanged;
- ``gradflow_p(w_h, b_h, w_x, b_x, h0, c0, xs, which) -> log10 ||∂L/∂h_t|| [C, T]``: `rnnlab.gradflow.grad_norms`
  with its default loss for C configurations of one cell at once, configuration c on ``xs[:, which[c]]``
  (`grad_norms` and `grad_norms_of_configs` here bind it; under `jax.vmap` the mapped axis becomes C). Each
  configuration runs as groups of 8 to 15 of its rows (`flow_groups`; whole below 16), each group whole on one
  thread, forward loop then log-domain backward loop, and the threads share out the groups: no barrier, the groups'
  squared norms added at the end. A single configuration of fewer than 16 rows has its hidden units split over the
  threads (`flow_team`).
- ``gradflow_direct_p(w_h, b_h, w_x, b_x, h0, c0, xs, which, direct) -> [C, T]``: the same for a loss of the
  user's, given by its direct cotangents ``direct [C, T, N, H]`` (`grad_norms_direct`): the backward loop starts
  from zero and adds each step's, both brought to the larger log10 scale; never in a team.

Each has a pure-JAX reference (`rnnlab.fused`'s step and tangent rule in a `lax.scan`) that is its lowering wherever
the kernel does not apply (not a CPU, not float32, no C++ compiler, ``RNNLAB_NATIVE=0``) and its rule for
derivatives of derivatives, so the kernels only ever change speed. A hidden size that is not a multiple of 16 runs
padded to the next one with units that stay zero (`kernel_hidden`; `rnnlab.fused` pads a cell's recurrence once, and
any other call of a primitive is padded where it is lowered): at hidden 100, an LSTM's gradient at batch 32, T = 100
took 15-21 ms padded against 24-28 ms on XLA, and a sweep-style `grad_norms` (LSTM, hidden 50, T = 1000) 35 against
73 ms. On a GPU the cells' references lower with their loops unrolled ``$RNNLAB_GPU_UNROLL`` times (default 8): each
iteration of an XLA loop on a GPU costs launches and a host round trip whatever its work, and unrolling 8 steps made
the cells' gradients 1.1-1.9x faster on an H200 at every shape of ``benchmarks/bench_cells.py``
(``benchmarks/README.md``). The gradient-flow engine's loops there run ``$RNNLAB_GPU_FLOW_UNROLL`` steps per
iteration (default 1: 8 ran the sweep's steady state 1.2-1.3x faster on an H200 but compiled it seconds longer). Where
``W_h`` fits one program's registers (the plain RNN to hidden 128, the LSTM and GRU to hidden 64) or a team of four
programs' (the LSTM and GRU at 128, the plain RNN at 256, while the batch's teams fit the GPU's multiprocessors: to
batch 528 on an H100; one device), the cells' loops there are Pallas kernels instead, the masked twins' too
(`rnnlab.native.pallas`: one program, or a team exchanging its units every step, per 16 rows runs every step;
``RNNLAB_PALLAS=0`` turns them off): at batch 16, T = 1000 on an H100, 1.6-1.7x (LSTM and GRU, hidden 128, teams) to
3.3x (tanh RNN, hidden 64) faster than the XLA loops.

With the batch split over several devices, each device runs the kernels on its own rows: in a jit that XLA's SPMD
partitioner splits, through `custom_partitioning` (`_partitioned`); traced within `split_batch` (as `rnnlab.train`
traces its steps), in `jax.shard_map`, which leaves no Python callback in the program, so that JAX's persistent
compilation cache holds it across processes; in `jax.sharding`'s explicit mode, where the operands' types split the
batch, in `jax.shard_map` too (`bind`).

The library is compiled on first use with the system's C++ compiler (``$CXX``, else ``g++``; ``-O3 -march=native``,
about 3 s) into ``$RNNLAB_NATIVE_CACHE`` (default ``~/.cache/rnnlab/native``), keyed by the source, the flags, the
CPU and jaxlib's version; ``make`` builds it at install. ``RNNLAB_NATIVE_THREADS`` sets the threads per kernel
(default: the usable cores divided by the local CPU devices). A kernel's calling thread waits for its helper tasks
to start; where one started on the caller's CPU, or has not started within ``RNNLAB_NATIVE_HELPER_START_US`` µs
(0 to 100000, default 250), one of the two moves itself to another CPU of its affinity mask (Linux may queue a
woken helper behind its caller while another CPU idles; `recurrent.cc`'s `step_aside`, counted by `steps_aside`).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

_SOURCE = Path(__file__).with_name("recurrent.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")
#: FFI target name -> the library's handler symbol.
_TARGETS = {"rnnlab_lstm_forward": "RnnlabLstmForward", "rnnlab_lstm_backward": "RnnlabLstmBackward",
            "rnnlab_gru_forward": "RnnlabGruForward", "rnnlab_gru_backward": "RnnlabGruBackward",
            "rnnlab_rnn_forward": "RnnlabRnnForward", "rnnlab_rnn_backward": "RnnlabRnnBackward",
            "rnnlab_lstm_infer": "RnnlabLstmInfer", "rnnlab_lstm_forward_inputs": "RnnlabLstmForwardInputs",
            "rnnlab_gru_forward_inputs": "RnnlabGruForwardInputs", "rnnlab_gradflow": "RnnlabGradflow"}
_TARGETS.update({f"{target}_masked": f"{symbol}Masked" for target, symbol in list(_TARGETS.items())
                 if target != "rnnlab_gradflow"})
_TARGETS["rnnlab_gradflow_direct"] = "RnnlabGradflowDirect"
#: The hidden size the kernels take must be a multiple of this: their widest vector of float32 (AVX-512's 16; with
#: AVX2 alone they work in vectors of 8, `recurrent.cc`'s kLanes). Other sizes run padded (`kernel_hidden`).
LANES = 16

_log = logging.getLogger(__name__)


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("RNNLAB_NATIVE_CACHE", Path.home() / ".cache" / "rnnlab" / "native"))


def build(compiler: str | None = None) -> Path:
    """Compile ``recurrent.cc`` (if not already in the cache) and return the shared library's path.

    **Raises:** ``RuntimeError`` naming the compiler and its output when there is no compiler or it fails.
    """
    compiler = compiler or os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"rnnlab.native: no C++ compiler {compiler!r} on PATH (set $CXX)")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(_FLAGS).encode(), compiler.encode(), _cpu_signature().encode(),
                    jaxlib.__version__.encode()])
    ).hexdigest()[:20]
    target = _cache_dir() / key / "librnnlab_native.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compiled under a temporary name and renamed, so concurrent first uses (test workers) never load half a file.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    command = [compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), str(_SOURCE), "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"rnnlab.native: {' '.join(command)} failed:\n{result.stderr}")
    os.replace(partial, target)
    return target


def enabled() -> bool:
    """Whether the kernels are switched on (``RNNLAB_NATIVE`` is not ``0``): read when a program is traced, so that
    callers route the built-in cells to the primitives. Where the C++ kernels cannot run, the primitives lower to
    their plain-JAX references."""
    return os.environ.get("RNNLAB_NATIVE", "1") != "0"


def available() -> bool:
    """Whether the kernels are on (`enabled`), built, loaded and registered with XLA's CPU backend (built on the
    first call)."""
    return enabled() and _loaded()


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The kernels' library, built and loaded, its targets registered with XLA (None where it cannot be built)."""
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as error:
        _log.warning("rnnlab.native unavailable, the LSTM, GRU and RNN run on XLA alone: %s", error)
        return None
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return library


def _loaded() -> bool:
    return _library() is not None


def threads() -> int:
    """Threads per kernel call: ``$RNNLAB_NATIVE_THREADS``, else the usable cores shared among the CPU devices (two
    devices each running a kernel must not oversubscribe the cores)."""
    if "RNNLAB_NATIVE_THREADS" in os.environ:
        return max(1, int(os.environ["RNNLAB_NATIVE_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, len(jax.local_devices(backend="cpu"))))


def _steps_per_iteration(variable: str, default: int) -> int:
    return max(1, int(os.environ.get(variable, str(default))))


def gpu_unroll() -> int:
    """Steps per loop iteration in the cells' loops on a GPU: ``$RNNLAB_GPU_UNROLL``, default 8; read at lowering."""
    return _steps_per_iteration("RNNLAB_GPU_UNROLL", 8)


def gpu_flow_unroll() -> int:
    """Steps per loop iteration in the gradient-flow engine's loops on a GPU: ``$RNNLAB_GPU_FLOW_UNROLL``, default 1;
    read at lowering. On an H200 8 made the sweep's steady state 1.2-1.3x faster (by 16-21 ms), but its compilation
    in process 2.9 s longer and a fresh process's sweep with a cold cache 6.6 s slower (14.6 against 8.0 s, in two
    runs; `benchmarks/bench_gradflow_sweep.py`, benchmarks/README.md): a sweep is compiled more often than rerun."""
    return _steps_per_iteration("RNNLAB_GPU_FLOW_UNROLL", 1)


def gpu_pallas() -> bool:
    """Whether the cells' loops run as Pallas kernels on a GPU where they apply (`rnnlab.native.pallas`):
    ``$RNNLAB_PALLAS`` is not ``0``; read at lowering."""
    return os.environ.get("RNNLAB_PALLAS", "1") != "0"


def applies(hidden: int, dtype) -> bool:
    """Whether the kernels can run a cell of this hidden size and dtype on the CPU backend (any size: they run a
    size that is not a multiple of `LANES` padded to `kernel_hidden`)."""
    return hidden > 0 and jnp.dtype(dtype) == jnp.float32 and available()


def kernel_hidden(hidden: int) -> int:
    """The hidden size the kernels run a cell of ``hidden`` units at: the next multiple of `LANES`."""
    return -(-hidden // LANES) * LANES


def padded_hidden(hidden: int, dtype) -> int:
    """The hidden size a cell of ``hidden`` units and ``dtype`` runs at on the default backend: `kernel_hidden` where
    the kernels apply there, else ``hidden``."""
    return kernel_hidden(hidden) if jax.default_backend() == "cpu" and applies(hidden, dtype) else hidden


def resize_hidden(x, dims: str, hidden: int, size: int):
    """``x`` with each hidden axis among ``dims`` (labels as in `_axes`: ``k`` and ``h`` a hidden size, ``g`` gate
    blocks of it, ``kb`` a hidden size and one more, a bias's row: the GRU's weight tangent and gradient) resized from
    ``hidden`` to ``size`` units: zero units appended to each block, or cut off."""
    for axis, label in enumerate(dims.split()):
        if label == "kb":  # the units, resized as a ``k`` axis, then the bias's row
            units, bias = jnp.split(x, [x.shape[axis] - 1], axis=axis)
            x = jnp.concatenate([resize_hidden(units, " ".join("k" if i == axis else "_" for i in range(x.ndim)),
                                               hidden, size), bias], axis=axis)
            continue
        if label not in ("k", "h", "g"):
            continue
        shape = x.shape
        blocks = x.reshape(shape[:axis] + (shape[axis] // hidden, hidden) + shape[axis + 1:])
        if size > hidden:
            widths = [(0, 0)] * blocks.ndim
            widths[axis + 1] = (0, size - hidden)
            blocks = jnp.pad(blocks, widths)
        else:
            blocks = jax.lax.slice_in_dim(blocks, 0, size, axis=axis + 1)
        x = blocks.reshape(shape[:axis] + (shape[axis] // hidden * size,) + shape[axis + 1:])  # no -1: sizes of 0
    return x


def _padded_call(p, labels: str, hidden: int, *operands, **params):
    """``p`` bound at the kernels' hidden size (`kernel_hidden`), its results cut back to ``hidden`` units.

    The added units have zero rows and columns in W_h and W_x, zero biases, zero initial carries and zero
    cotangents, so every cell keeps them at zero: their pre-activations are 0, which gives the tanh RNN, the ReLU
    and the linear RNN h = 0, the LSTM c = σ(0)·0 + σ(0)·tanh(0) = 0 and h = σ(0)·tanh(0) = 0, and the GRU
    h = (1 - σ(0))·tanh(0) + σ(0)·0 = 0 (what they save for the backward pass may differ from the cell's own values
    there, but only ever multiplies their zero cotangents). Zero rows of W_h keep them out of the real units'
    pre-activations, and zero columns keep the real units' cotangents from them: the real units' numbers are those
    of the unpadded cell, and the default loss of the gradient-flow kernel (Σ h_T²) gives them no cotangent.

    For finite numbers. An infinite state (a ReLU or linear RNN past float32's range) or an infinite input of the
    gradient-flow kernel (which projects the inputs itself) meets the added units' zero weights, and inf · 0 = nan
    then reaches every unit: nan where the unpadded cell has inf (non-finite either way, as a sweep records it), and
    nan where the unpadded gradient-flow kernel gives finite numbers (a tanh of an infinite input)."""
    size = kernel_hidden(hidden)
    operand_dims, result_dims = (part.split(",") for part in labels.split("->"))
    padded = [resize_hidden(x, dims, hidden, size) for x, dims in zip(operands, operand_dims)]
    results = p.bind(*padded, **params)
    return [resize_hidden(x, dims, size, hidden) for x, dims in zip(results, result_dims)]


# --- references: the same maths in plain JAX ------------------------------------------------------------------------


def _previous(seq, first, reverse):
    from rnnlab import fused

    return fused._previous(seq, first, reverse)


def _reference_forward(w_h, h0, c0, px, *, reverse, threads, unroll=1, valid=None):
    from rnnlab import fused

    step = functools.partial(fused._lstm_step, {"w_h": w_h})
    _, ((hs, cs), gates) = fused._masked_scan(step, (h0, c0), px, valid, reverse, unroll)
    return hs, cs, gates


def _reference_forward_inputs(w_h, w_x, b, h0, c0, xs, *, reverse, threads, unroll=1, valid=None):
    """`lstm_forward_inputs_p`'s maths: the inputs projected for all steps, then `lstm_forward_p` (on a GPU its
    kernel), or its masked twin."""
    mask, p = ((), lstm_forward_p) if valid is None else ((valid,), lstm_forward_masked_p)
    return p.bind(w_h, h0, c0, xs @ w_x + b, *mask, reverse=reverse, threads=threads)


def _reference_gru_forward_inputs(w_h, b_h, w_x, b_x, h0, xs, *, reverse, threads, unroll=1, valid=None):
    """`gru_forward_inputs_p`'s maths: the inputs projected for all steps, then `gru_forward_p` (on a GPU its
    kernel), or its masked twin."""
    mask, p = ((), gru_forward_p) if valid is None else ((valid,), gru_forward_masked_p)
    return p.bind(w_h, b_h, h0, xs @ w_x + b_x, *mask, reverse=reverse, threads=threads)


def _reference_infer(w_h, w_x, b, h0, c0, xs, *, reverse, threads, unroll=1, valid=None):
    """`lstm_infer_p`'s maths: `lstm_forward_inputs_p`'s, its outputs and final cell state (masked: kept through
    the invalid steps, so the last step's)."""
    hs, cs, _ = _reference_forward_inputs(w_h, w_x, b, h0, c0, xs, reverse=reverse, threads=threads, valid=valid)
    return hs, cs[0 if reverse else -1]


def _weight_term(hs, h0, dw, reverse):
    """The tangent's ``h_{t-1} Ẇ_h`` term for all steps, ``[T, B, G·H]``; its transpose is W_h's gradient."""
    from rnnlab import fused

    return fused._weight_tangent(_previous(hs, h0, reverse), dw)


def _weight_gradient(hs, h0, recurrent_cotangent, reverse, flat):
    """``Σ_t h_{t-1}ᵀ g_t``: W_h's gradient from each step's cotangent of ``h_{t-1} W_h``.

    ``flat``: as one ``[H, T·B] @ [T·B, G·H]`` matmul, which XLA's CPU backend runs about twice as fast as the same
    contraction over two axes (15 against 29 ms at T 1000, batch 16, hidden 128), but which gathers a batch split
    over devices; there the two-axis form."""
    h_prev = _previous(hs, h0, reverse)
    if flat:
        return h_prev.reshape(-1, h_prev.shape[-1]).T @ recurrent_cotangent.reshape(-1, recurrent_cotangent.shape[-1])
    return jnp.einsum("tbh,tbg->hg", h_prev, recurrent_cotangent)


def _reference_tangent(w_h, gates, cs, c0, hs, h0, u, dw, dh0, dc0, *, reverse, threads, unroll=1, valid=None):
    from rnnlab import fused

    params = {"w_h": w_h}
    coeffs = fused._lstm_coefficients(params, gates, (None, cs), (None, _previous(cs, c0, reverse)))
    step = lambda d_carry, inputs: (fused._lstm_tangent_step(params, d_carry, *inputs), ())  # noqa: E731
    u = u + _weight_term(hs, h0, dw, reverse)
    (dh, dc), dhs = fused._masked_scan(step, (dh0, dc0), (u, coeffs), valid, reverse, unroll, fused._emit_hidden)
    return dhs, dh, dc


def _lstm_weight_gradient(operands, g_u, reverse, flat):
    hs, h0 = operands[4], operands[5]
    return _weight_gradient(hs, h0, g_u, reverse, flat)


def _reference_gru_forward(w_h, b_h, h0, px, *, reverse, threads, unroll=1, valid=None):
    from rnnlab import fused

    step = functools.partial(fused._gru_step, {"w_h": w_h, "b_h": b_h})
    _, (hs, saved) = fused._masked_scan(step, h0, px, valid, reverse, unroll)
    hidden = hs.shape[-1]
    return hs, saved[..., : 3 * hidden], saved[..., 3 * hidden:]


def _reference_gru_tangent(w_h, gates, a_n, hs, h0, u, dw, dh0, *, reverse, threads, unroll=1, valid=None):
    """``dw [H + 1, 3H]``: the tangents of W_h and, as its last row, of b_h (the tangent of ``a = h W_h + b_h``)."""
    from rnnlab import fused

    params = {"w_h": w_h}
    saved = jnp.concatenate([gates, a_n], axis=-1)
    coeffs = fused._gru_coefficients(params, saved, hs, _previous(hs, h0, reverse))
    step = lambda dh, inputs: (fused._gru_tangent_step(params, dh, *inputs), ())  # noqa: E731
    u = u + fused._through_reset(gates[..., : hs.shape[-1]], _weight_term(hs, h0, dw[:-1], reverse) + dw[-1])
    dh, dhs = fused._masked_scan(step, dh0, (u, coeffs), valid, reverse, unroll, fused._emit_hidden)
    return dhs, dh


def _gru_weight_gradient(operands, g_u, reverse, flat):
    """W_h's gradient and, as one more row, b_h's, ``[H + 1, 3H]``."""
    from rnnlab import fused

    gates, hs, h0 = operands[1], operands[3], operands[4]
    # The transpose of `_through_reset` is itself: the n-block of the cotangent times r.
    recurrent = fused._through_reset(gates[..., : hs.shape[-1]], g_u)
    bias = jnp.sum(recurrent, axis=tuple(range(recurrent.ndim - 1)))
    return jnp.concatenate([_weight_gradient(hs, h0, recurrent, reverse, flat), bias[None]])


def _reference_rnn_forward(w_h, h0, px, *, reverse, threads, activation, unroll=1, valid=None):
    from rnnlab import fused

    step = functools.partial(fused._RNN[activation].step, {"w_h": w_h})
    return (fused._masked_scan(step, h0, px, valid, reverse, unroll, fused._emit_hidden)[1],)


def _reference_rnn_tangent(w_h, hs, h0, u, dw, dh0, *, reverse, threads, activation, unroll=1, valid=None):
    from rnnlab import fused

    kernel, params = fused._RNN[activation], {"w_h": w_h}
    coeffs = kernel.coefficients(params, (), hs, None)
    step = lambda dh, inputs: (kernel.tangent_step(params, dh, *inputs), ())  # noqa: E731
    u = u + _weight_term(hs, h0, dw, reverse)
    dh, dhs = fused._masked_scan(step, dh0, (u, coeffs), valid, reverse, unroll, fused._emit_hidden)
    return dhs, dh


def _rnn_weight_gradient(operands, g_u, reverse, flat):
    hs, h0 = operands[1], operands[2]
    return _weight_gradient(hs, h0, g_u, reverse, flat)


def _pallas_kernel(name: str, weight_gradient=None):
    """A primitive's ``gpu_kernel`` (`_primitive`): `rnnlab.native.pallas`'s function ``name`` where
    `pallas.applies` (``interpret``: run by Pallas's interpreter, to test it without a GPU), else None; for a
    backward primitive (``weight_gradient`` given) with W_h's gradient one XLA matmul after it. A masked twin's
    (`_cell_primitive`) is called with ``mask_at``, the index of its ``valid`` operand."""

    def gpu_kernel(avals, params, interpret=False, mask_at=None):
        from rnnlab.native import pallas

        def without_mask(operands):
            return list(operands) if mask_at is None else [*operands[:mask_at], *operands[mask_at + 1:]]

        avals, activation = without_mask(avals), params.get("activation")
        sequence = next(aval for aval in avals if aval.ndim == 3)  # [T, B, ...]
        if not pallas.applies(avals[0].shape, sequence.shape, [aval.dtype for aval in avals], activation):
            return None
        run = functools.partial(getattr(pallas, name), reverse=params["reverse"], interpret=interpret,
                                **({} if activation is None else {"activation": activation}))

        def kernel(*operands):
            unmasked = without_mask(operands)
            results = run(*unmasked, valid=None if mask_at is None else operands[mask_at])
            if weight_gradient is None:
                return results
            g_u, *g_carry = results
            gradient = functools.partial(weight_gradient, unmasked, g_u, params["reverse"], True)
            if params.get("weight_grad") == "none":  # zeros of its shape: the caller forms it
                shape = jax.eval_shape(gradient)
                g_w = jnp.zeros(shape.shape, shape.dtype)
            else:
                g_w = gradient()
            return [g_u, g_w, *g_carry]

        return kernel

    return gpu_kernel


def _transposed(tangent, residuals: int, shapes):
    """The backward reference of a tangent reference ``tangent(*residuals, u, dw, *d_carry)``: its transpose in
    ``(u, dw, *d_carry)``, applied to the cotangents of ``(dhs, *d_final_carry)``. Returns ``(g_u, g_w,
    *g_carry)``, shaped as ``shapes(*operands)`` (the backward primitive's results, which are the shapes of ``(u,
    dw, *d_carry)``: the GRU's ``dw`` with b_h's row); ``weight_grad`` is the kernel's business, so ignored here."""

    def backward(*operands, weight_grad="kernel", **params):
        fixed, cotangents = operands[:residuals], operands[residuals:]
        zeros = [jnp.zeros(shape, dtype) for shape, dtype in shapes(*operands)]
        linear = jax.linear_transpose(lambda *lin: tangent(*fixed, *lin, **params), *zeros)
        return linear(tuple(cotangents))

    return backward


# --- primitives -----------------------------------------------------------------------------------------------------


def _instantiate(tangent, like):
    if type(tangent) is not ad.Zero:
        return tangent
    if not jnp.issubdtype(like.dtype, jnp.inexact):  # an index (the gradient-flow kernel's `which`)
        return np.zeros(like.shape, jax.dtypes.float0)
    return jnp.zeros(like.shape, like.dtype)


def _axes(labels: str) -> tuple[tuple, tuple]:
    """Each operand's and each result's batch axis (None: none, as for the weights) from a rule such as
    ``"k g, b h, t b g -> t b h"``: one label per dimension, ``b`` the batch."""
    def batch_axis(dims: str):
        return dims.split().index("b") if "b" in dims.split() else None

    operands, results = labels.split("->")
    return tuple(map(batch_axis, operands.split(","))), tuple(map(batch_axis, results.split(",")))


def _ffi_call(target: str, out_shapes, aliases: dict, params: dict):
    """The kernel as a function of its operands."""

    def call(*args):
        outs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in out_shapes(*args)]
        return tuple(jax.ffi.ffi_call(target, outs, input_output_aliases=aliases)(*args, **params))

    return call


def _batch_spec(rank: int, batch: int | None, axis) -> PartitionSpec:
    """The spec of a rank-``rank`` operand whose axis ``batch`` (None: none) is split over mesh axis ``axis``."""
    return PartitionSpec(*(axis if i == batch else None for i in range(rank)))


def _partitioned(target: str, out_shapes, labels: str, aliases: dict, params: dict, summed: int | None = None):
    """The kernel call as a `custom_partitioning` function that XLA's SPMD partitioner splits along the batch axis:
    each device runs the kernel on its own rows (an opaque custom call would otherwise be gathered and run whole on
    every device). Every other dimension must stay whole. Result ``summed`` (W_h's gradient) is a sum over the
    batch: each device's part is all-reduced."""
    batch_in, batch_out = _axes(labels)
    kernel = _ffi_call(target, out_shapes, aliases, params)

    def partition(mesh, arg_shapes, result_shapes):
        specs = [a.sharding.spec for a in arg_shapes]
        axis = next((spec[b] for spec, b in zip(specs, batch_in) if b is not None and len(spec) > b), None)

        def sharding(rank, batch):
            return NamedSharding(mesh, _batch_spec(rank, batch, axis))

        def local(*args):
            outs = list(kernel(*args))
            if summed is not None and axis is not None:
                outs[summed] = jax.lax.psum(outs[summed], axis)
            return tuple(outs)

        return (mesh, local, tuple(sharding(len(r.shape), b) for r, b in zip(result_shapes, batch_out)),
                tuple(sharding(len(a.shape), b) for a, b in zip(arg_shapes, batch_in)))

    function = custom_partitioning(kernel)
    whole = list(dict.fromkeys(labels.replace("->", ",").replace(",", " ").split()))  # in order of appearance
    function.def_partition(partition, sharding_rule=labels,
                           need_replication_factors=tuple(name for name in whole if name != "b"))
    return function


#: ``(mesh, axis)`` while `split_batch` is on.
_BATCH_SPLIT: contextvars.ContextVar[tuple[Mesh, str | tuple[str, ...]] | None] = contextvars.ContextVar(
    "rnnlab_batch_split", default=None)


def _axis_names(axis) -> tuple:
    """A `PartitionSpec` entry's mesh axes: ``axis`` itself where it is a tuple of names, else ``(axis,)``."""
    return axis if isinstance(axis, tuple) else (axis,)


@contextlib.contextmanager
def split_batch(mesh: Mesh, axis: str | tuple[str, ...]):
    """Within it, what is traced binds the cells' primitives (`bind`) in `jax.shard_map` over ``mesh``, with the
    batch split along mesh axis ``axis`` (or a tuple of axes, split over all of them) and every other dimension
    whole; W_h's gradient is each device's sum over its rows, all-reduced by `shard_map`'s transpose. That is what
    the primitives' `custom_partitioning` lowering does for a batch XLA's partitioner splits, but with no Python
    callback in the program, whose id would make JAX's persistent-cache key differ in every process (training on 2
    CPU devices: first step 3.9 s with a warm cache, against 1.8 s on one device). `rnnlab.train.train` traces its
    steps within it when it splits the batch.

    It also makes ``mesh`` JAX's abstract-mesh context (`jax.sharding.use_abstract_mesh`), which is part of jit's
    cache key: a jitted function traced within is traced afresh when called outside, and one traced outside afresh
    when called within.

    The numbers are the same either way: a primitive whose batch does not divide by the axis's size is bound as it
    is, and within a `shard_map` body (where the mesh's axes are already manual) this does nothing."""
    names = _axis_names(axis)
    if not names or len(set(names)) < len(names) or not all(name in mesh.axis_names for name in names):
        raise ValueError(f"split_batch: axis {axis!r} is not one of the mesh's axes {mesh.axis_names}, nor a tuple "
                         "of distinct ones.")
    if AxisType.Manual in jax.sharding.get_abstract_mesh().axis_types:
        yield
        return
    token = _BATCH_SPLIT.set((mesh, axis))
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            yield
    finally:
        _BATCH_SPLIT.reset(token)


def _explicit_split(operands, batch_axes):
    """``(mesh, axis)`` where the operands' types split their batch axis over mesh axes of `AxisType.Explicit`
    (`jax.sharding`'s explicit mode, whose types carry their sharding), each split one along the same ``axis`` (a
    name or a tuple of names); else None."""
    axes, mesh = set(), None
    for x, b in zip(operands, batch_axes):
        sharding = jax.typeof(x).sharding
        if b is not None and len(sharding.spec) > b and sharding.spec[b] is not None:
            axes.add(sharding.spec[b])
            mesh = sharding.mesh
    if len(axes) != 1:  # none split (a carry of zeros is not), or split in different ways: left to JAX
        return None
    axis = axes.pop()
    names = _axis_names(axis)
    explicit = all(mesh.axis_types[mesh.axis_names.index(name)] == AxisType.Explicit for name in names)
    return (mesh, axis) if explicit else None


def _devices_along(mesh: Mesh, axis) -> int:
    return int(np.prod([mesh.shape[name] for name in _axis_names(axis)]))


def _split_of(operands, batch_axes):
    """``(mesh, axis, explicit)`` where operands with batch axes ``batch_axes`` (None: none) are to be split along
    mesh axis ``axis``: within `split_batch` (``explicit`` false), or where their types split it (`jax.sharding`'s
    explicit mode). None where they stay as they are: no split, one device along ``axis``, within a `shard_map`
    body (the mesh's axes already manual), or a batch that does not divide."""
    split = _BATCH_SPLIT.get()
    explicit = split is None
    if explicit:
        split = _explicit_split(operands, batch_axes)
    if split is None:
        return None
    mesh, axis = split
    count = _devices_along(mesh, axis)
    sizes = {x.shape[b] for x, b in zip(operands, batch_axes) if b is not None}
    manual = AxisType.Manual in jax.sharding.get_abstract_mesh().axis_types
    if count == 1 or manual or any(size % count for size in sizes):
        return None
    return mesh, axis, explicit


def bind(p: Primitive, *operands, **params):
    """``p.bind(*operands, **params)``, in `jax.shard_map` with the batch split where it is: within `split_batch`
    (see there) along its axis, and where the operands' types (`jax.sharding`'s explicit mode) split it. Without
    this, explicit mode gathered a split batch and ran the kernels whole on every device, its results' types
    replicated."""
    batch_in, batch_out = p.batch_axes
    split = _split_of(operands, batch_in)
    if split is None:
        return p.bind(*operands, **params)
    mesh, axis, explicit = split
    in_specs = tuple(_batch_spec(jnp.ndim(x), b, axis) for x, b in zip(operands, batch_in))
    if explicit:  # the types must match the specs: a carry of zeros is split, a weight split otherwise made whole
        operands = [jax.sharding.reshard(x, s) for x, s in zip(operands, in_specs)]
    out_ranks = [len(shape) for shape, _ in p.out_shapes(*operands)]
    return jax.shard_map(lambda *xs: p.bind(*xs, **params), mesh=mesh, in_specs=in_specs,
                         out_specs=[_batch_spec(rank, b, axis) for rank, b in zip(out_ranks, batch_out)],
                         check_vma=False)(*operands)


def _several_devices(ctx) -> bool:
    """Whether the primitive is lowered in a jit over several devices (JAX names them to the lowering)."""
    axis_context = ctx.module_context.axis_context
    return (getattr(axis_context, "num_devices", 1) > 1
            and getattr(axis_context, "device_assignment", None) is not None)


def _exporting(ctx) -> bool:
    return getattr(ctx.module_context.lowering_parameters, "for_export", False)


def _primitive(name: str, reference, out_shapes, labels: str, target: str | None, aliases: dict | None = None,
               weight_gradient=None, gpu_steps=gpu_unroll, gpu_kernel=None):
    """A primitive lowered to ``target`` on CPU where the kernels apply and to ``reference`` elsewhere (its first
    operand is ``w_h [H, G·H]``, or ``[C, H, G·H]``); on a GPU to ``gpu_kernel(avals, params)`` where that returns
    a function (of the operands, with the results of ``reference``), else to ``reference`` called with
    ``unroll=gpu_steps()``.

    ``out_shapes(*avals) -> [(shape, dtype)]``; ``labels``: the dimensions of operands and results (`_axes`);
    ``aliases``: ``{operand: result}`` pairs the kernel may write in place, each operand read at a step before the
    result is written there. XLA then gives the result the operand's buffer (copying the operand first only if it
    is still needed): less memory, and fewer large buffers written afresh, each page of which costs a page fault
    (1–2 µs per 4 KB on this project's 2-core VM).

    A backward primitive (``weight_gradient`` given) returns ``(g_u, g_w, *carry)``, ``g_w`` being W_h's gradient
    (a sum over steps and batch; the GRU's with b_h's as one more row), and takes ``weight_grad``: ``"kernel"``
    (summed in the kernel's loop; across devices each sums its rows and the parts are all-reduced), ``"xla"`` (one
    XLA matmul after it: ``weight_gradient(operands, g_u, reverse, flat)``) or ``"none"`` (zeros: the caller forms
    it, as the batching rule does with one per example).
    """
    aliases = aliases or {}
    batch_axes, out_batch_axes = _axes(labels)
    p = Primitive(name)
    p.multiple_results = True
    # Outside jit (eager `rnnlab.scan`): one compiled program per setting of the parameters.
    jitted = functools.cache(lambda items: jax.jit(functools.partial(p.bind, **dict(items))))
    p.def_impl(lambda *args, **params: jitted(tuple(sorted(params.items())))(*args))
    p.def_abstract_eval(lambda *avals, **params: [jax.core.ShapedArray(s, d) for s, d in out_shapes(*avals)])

    reference_rule = mlir.lower_fun(reference, multiple_results=True)
    mlir.register_lowering(p, reference_rule)

    def gpu_rule(ctx, *args, **params):
        # One device only: the Pallas kernels are opaque to XLA's partitioner, which would gather a split batch.
        # Not in `jax.export` either, which refuses Triton calls (no compatibility guarantee), nor on ROCm, where
        # they have never run. Lowered for a CPU (only a test does that: `p.gpu_rule`), they run in Pallas's
        # interpreter.
        platforms = ctx.module_context.platforms
        kernel = (gpu_kernel(ctx.avals_in, params, interpret="cpu" in platforms)
                  if gpu_kernel is not None and gpu_pallas() and "rocm" not in platforms
                  and not _several_devices(ctx) and not _exporting(ctx) else None)
        if kernel is not None:
            with warnings.catch_warnings():  # see `rnnlab.native.pallas`
                warnings.filterwarnings("ignore", "The Pallas Triton backend is deprecated", DeprecationWarning)
                return mlir.lower_fun(kernel, multiple_results=True)(ctx, *args)
        unrolled = functools.partial(reference, unroll=gpu_steps())
        return mlir.lower_fun(unrolled, multiple_results=True)(ctx, *args, **params)

    for gpu in ("cuda", "rocm"):
        mlir.register_lowering(p, gpu_rule, platform=gpu)
    # For the tests: the rule, the kernel it lowers to (interpreted where asked) and the maths it must equal.
    p.gpu_rule, p.gpu_kernel, p.reference = gpu_rule, gpu_kernel, reference
    p.batch_axes, p.out_shapes = (batch_axes, out_batch_axes), out_shapes  # for `bind`
    if target is not None:
        kernel_rule = jax.ffi.ffi_lowering(target, operand_output_aliases=aliases)

        def cpu_rule(ctx, *args, **params):
            hidden = ctx.avals_in[0].shape[-2]  # w_h [H, G·H], or [C, H, G·H] for C configurations
            # `jax.export` refuses custom calls without compatibility guarantees: exported programs get XLA's loops.
            floats = [aval.dtype for aval in ctx.avals_in if jnp.issubdtype(aval.dtype, jnp.floating)]
            if _exporting(ctx) or not (all(dtype == jnp.float32 for dtype in floats) and applies(hidden, jnp.float32)):
                return reference_rule(ctx, *args, **params)
            if hidden % LANES:
                padded = functools.partial(_padded_call, p, labels, hidden)
                return mlir.lower_fun(padded, multiple_results=True)(ctx, *args, **params)
            several = _several_devices(ctx)
            mode = params.pop("weight_grad", None)
            if mode is not None:
                params["weight_grad"] = mode == "kernel"
            if not several and mode != "xla":
                return kernel_rule(ctx, *args, **params)
            kernel = (_partitioned(target, out_shapes, labels, aliases, params, 1 if mode == "kernel" else None)
                      if several else _ffi_call(target, out_shapes, aliases, params))
            if mode != "xla":
                return mlir.lower_fun(kernel, multiple_results=True)(ctx, *args)

            def with_weight_gradient(*operands):
                g_u, _, *carry = kernel(*operands)
                return (g_u, weight_gradient(operands, g_u, params["reverse"], not several), *carry)

            return mlir.lower_fun(with_weight_gradient, multiple_results=True)(ctx, *args)

        mlir.register_lowering(p, cpu_rule, platform="cpu")

    def jvp(primals, tangents, **params):
        tangents = [_instantiate(t, x) for t, x in zip(tangents, primals)]
        return jax.jvp(functools.partial(reference, **params), tuple(primals), tuple(tangents))

    ad.primitive_jvps[p] = jvp

    def batch(args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        if any(d is not None and axis is None for d, axis in zip(dims, batch_axes)):
            # Per-example weights: one call per example.
            args = [jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (size,) + a.shape)
                    for a, d in zip(args, dims)]
            return jax.lax.map(lambda xs: p.bind(*xs, **params), args), (0,) * len(out_batch_axes)
        # Shared weights: the mapped axis joins the batch axis (the rows of an LSTM are independent).
        merged = []
        for a, d, axis in zip(args, dims, batch_axes):
            if axis is None:
                merged.append(a)
                continue
            a = jnp.moveaxis(a, d, axis) if d is not None else jnp.broadcast_to(
                jnp.expand_dims(a, axis), a.shape[:axis] + (size,) + a.shape[axis:])
            merged.append(a.reshape(a.shape[:axis] + (-1,) + a.shape[axis + 2:]))
        if weight_gradient is None:
            outs = p.bind(*merged, **params)
        else:  # one W_h gradient per example, formed in XLA
            outs = p.bind(*merged, **{**params, "weight_grad": "none"})
        outs = [o if axis is None else o.reshape(o.shape[:axis] + (size, -1) + o.shape[axis + 1:])
                for o, axis in zip(outs, out_batch_axes)]
        if weight_gradient is None:
            return outs, out_batch_axes
        per_example = [jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (size,) + a.shape)
                       for a, d in zip(args, dims)]
        g_u = jnp.moveaxis(outs[0], out_batch_axes[0], 0)
        g_w = jax.vmap(lambda ops, g: weight_gradient(ops, g, params["reverse"], True))(per_example, g_u)
        return [g_u, g_w, *outs[2:]], (0, 0, *out_batch_axes[2:])

    batching.primitive_batchers[p] = batch
    return p


def _forward_shapes(w_h, h0, c0, px):
    steps, batch, gates = px.shape
    return [((steps, batch, gates // 4), px.dtype)] * 2 + [((steps, batch, gates), px.dtype)]


def _tangent_shapes(w_h, gates, cs, c0, hs, h0, u, dw, dh0, dc0):
    return [(cs.shape, u.dtype), (dh0.shape, dh0.dtype), (dc0.shape, dc0.dtype)]


def _backward_shapes(w_h, gates, cs, c0, hs, h0, g_hs, g_h, g_c):
    return [(gates.shape, g_hs.dtype), (w_h.shape, g_hs.dtype), (g_h.shape, g_h.dtype), (g_c.shape, g_c.dtype)]


def _gru_forward_shapes(w_h, b_h, h0, px):
    steps, batch, gates = px.shape
    return [((steps, batch, gates // 3), px.dtype), (px.shape, px.dtype), ((steps, batch, gates // 3), px.dtype)]


def _gru_tangent_shapes(w_h, gates, a_n, hs, h0, u, dw, dh0):
    return [(hs.shape, u.dtype), (dh0.shape, dh0.dtype)]


def _gru_backward_shapes(w_h, gates, a_n, hs, h0, g_hs, g_h):
    return [(gates.shape, g_hs.dtype), ((w_h.shape[0] + 1, w_h.shape[1]), g_hs.dtype), (g_h.shape, g_h.dtype)]


def _transpose_rule(backward_p, residuals: int, like: int, cell: str):
    """The transpose of a tangent primitive whose first ``residuals`` operands are residuals (``operands[like]``
    shaped like the sequence of dh's it returns) and the rest linear (``u``, ``Ẇ_h`` and the carry's tangent): the
    backward primitive on the cotangents of the tangent's results, symbolic zeros made real."""

    def rule(cotangents, *operands, **params):
        fixed, linear = operands[:residuals], operands[residuals:]
        likes = [operands[like]] + [x.aval if ad.is_undefined_primal(x) else x for x in linear[2:]]
        arguments = (*fixed, *(_instantiate(ct, shape) for ct, shape in zip(cotangents, likes)))
        mode = weight_grad_mode(cell, operands[like].shape[1])
        grads = backward_p.bind(*arguments, **params, weight_grad=mode)
        return [None] * residuals + [g if ad.is_undefined_primal(x) else None for g, x in zip(grads, linear)]

    return rule


def _cell_primitive(name: str, reference, out_shapes, labels: str, target: str | None, aliases: dict | None = None,
                    weight_gradient=None, gpu_kernel=None, mask_at: int = 0, residuals: int | None = None):
    """One cell kernel's primitive and its masked twin (`_primitive`): ``(plain, masked)``. The twin (named and
    targeted ``*_masked``) takes one more operand, ``valid [T, B]`` booleans, at index ``mask_at``, which is passed to
    ``reference`` as ``valid``, and to ``gpu_kernel`` as an operand at ``mask_at``. A backward primitive's
    ``reference`` is the tangent reference it transposes, whose first ``residuals`` operands are fixed."""

    def masked(function):
        return lambda *operands, **params: function(*operands[:mask_at], *operands[mask_at + 1:], **params)

    def with_valid(*operands, **params):
        return reference(*operands[:mask_at], *operands[mask_at + 1:], valid=operands[mask_at], **params)

    operands, results = labels.split("->")
    operands = operands.split(",")
    masked_labels = ",".join(operands[:mask_at] + [" t b"] + operands[mask_at:]) + "->" + results
    plain_reference, masked_reference = reference, with_valid
    masked_aliases = {operand + (operand >= mask_at): result for operand, result in (aliases or {}).items()}
    if residuals is not None:
        plain_reference = _transposed(reference, residuals, out_shapes)
        masked_reference = _transposed(with_valid, residuals + 1, masked(out_shapes))
    return (_primitive(name, plain_reference, out_shapes, labels, target, aliases, weight_gradient,
                       gpu_kernel=gpu_kernel),
            _primitive(f"{name}_masked", masked_reference, masked(out_shapes), masked_labels,
                       target and f"{target}_masked", masked_aliases, weight_gradient,
                       gpu_kernel=gpu_kernel and functools.partial(gpu_kernel, mask_at=mask_at)))


def _linear_primitives(cell: str, tangent_reference, tangent_shapes, tangent_labels: str, backward_shapes,
                       backward_labels: str, aliases: dict, weight_gradient, residuals: int, like: int,
                       gpu_kernel=None):
    """``cell``'s tangent primitive and the backward primitive that is its transpose (the kernel
    ``rnnlab_<cell>_backward``), each with its masked twin, whose mask follows the first ``residuals`` (fixed)
    operands: ``(tangent, tangent_masked, backward, backward_masked)``, with the transposes registered
    (`_transpose_rule`; ``operands[like]`` is shaped like the dh's the tangent returns)."""
    tangent, tangent_masked = _cell_primitive(f"rnnlab_{cell}_tangent", tangent_reference, tangent_shapes,
                                              tangent_labels, None, mask_at=residuals)
    backward, backward_masked = _cell_primitive(
        f"rnnlab_{cell}_backward", tangent_reference, backward_shapes, backward_labels, f"rnnlab_{cell}_backward",
        aliases, weight_gradient, gpu_kernel, mask_at=residuals, residuals=residuals)
    ad.primitive_transposes[tangent] = _transpose_rule(backward, residuals, like, cell)
    ad.primitive_transposes[tangent_masked] = _transpose_rule(backward_masked, residuals + 1, like, cell)
    return tangent, tangent_masked, backward, backward_masked


lstm_forward_p, lstm_forward_masked_p = _cell_primitive(
    "rnnlab_lstm_forward", _reference_forward, _forward_shapes, "k g, b h, b h, t b g -> t b h, t b h, t b g",
    "rnnlab_lstm_forward", {3: 2}, gpu_kernel=_pallas_kernel("lstm_forward"), mask_at=4)
lstm_tangent_p, lstm_tangent_masked_p, lstm_backward_p, lstm_backward_masked_p = _linear_primitives(
    "lstm", _reference_tangent, _tangent_shapes,
    "k g, t b g, t b h, b h, t b h, b h, t b g, k g, b h, b h -> t b h, b h, b h", _backward_shapes,
    "k g, t b g, t b h, b h, t b h, b h, t b h, b h, b h -> t b g, k g, b h, b h", {1: 0}, _lstm_weight_gradient,
    residuals=6, like=4, gpu_kernel=_pallas_kernel("lstm_backward", _lstm_weight_gradient))


def _projection_like(xs, b):
    """The shape and dtype of ``px = xs @ w_x + b``, ``[T, B, G·H]``, which a kernel projecting its inputs never
    forms: its results' shapes are those of the kernel on px."""
    return jax.ShapeDtypeStruct(xs.shape[:2] + b.shape, xs.dtype)


def _forward_inputs_shapes(w_h, w_x, b, h0, c0, xs):
    return _forward_shapes(w_h, h0, c0, _projection_like(xs, b))


lstm_forward_inputs_p, lstm_forward_inputs_masked_p = _cell_primitive(
    "rnnlab_lstm_forward_inputs", _reference_forward_inputs, _forward_inputs_shapes,
    "k g, i g, g, b h, b h, t b i -> t b h, t b h, t b g", "rnnlab_lstm_forward_inputs", mask_at=6)


def _infer_shapes(w_h, w_x, b, h0, c0, xs):
    hs_shape = _forward_inputs_shapes(w_h, w_x, b, h0, c0, xs)[0]
    return [hs_shape, (c0.shape, c0.dtype)]


lstm_infer_p, lstm_infer_masked_p = _cell_primitive(
    "rnnlab_lstm_infer", _reference_infer, _infer_shapes, "k g, i g, g, b h, b h, t b i -> t b h, b h",
    "rnnlab_lstm_infer", mask_at=6)
gru_forward_p, gru_forward_masked_p = _cell_primitive(
    "rnnlab_gru_forward", _reference_gru_forward, _gru_forward_shapes, "k g, g, b h, t b g -> t b h, t b g, t b h",
    "rnnlab_gru_forward", {3: 1}, gpu_kernel=_pallas_kernel("gru_forward"), mask_at=4)
gru_tangent_p, gru_tangent_masked_p, gru_backward_p, gru_backward_masked_p = _linear_primitives(
    "gru", _reference_gru_tangent, _gru_tangent_shapes, "k g, t b g, t b h, t b h, b h, t b g, kb g, b h -> t b h, b h",
    _gru_backward_shapes, "k g, t b g, t b h, t b h, b h, t b h, b h -> t b g, kb g, b h", {1: 0},
    _gru_weight_gradient, residuals=5, like=3, gpu_kernel=_pallas_kernel("gru_backward", _gru_weight_gradient))
gru_forward_inputs_p, gru_forward_inputs_masked_p = _cell_primitive(
    "rnnlab_gru_forward_inputs", _reference_gru_forward_inputs,
    lambda w_h, b_h, w_x, b_x, h0, xs: _gru_forward_shapes(w_h, b_h, h0, _projection_like(xs, b_x)),
    "k g, g, i g, g, b h, t b i -> t b h, t b g, t b h", "rnnlab_gru_forward_inputs", mask_at=6)
rnn_forward_p, rnn_forward_masked_p = _cell_primitive(
    "rnnlab_rnn_forward", _reference_rnn_forward, lambda w_h, h0, px: [(px.shape, px.dtype)],
    "k h, b h, t b h -> t b h", "rnnlab_rnn_forward", {2: 0}, gpu_kernel=_pallas_kernel("rnn_forward"), mask_at=3)
rnn_tangent_p, rnn_tangent_masked_p, rnn_backward_p, rnn_backward_masked_p = _linear_primitives(
    "rnn", _reference_rnn_tangent, lambda w_h, hs, h0, u, dw, dh0: [(hs.shape, u.dtype), (dh0.shape, dh0.dtype)],
    "k h, t b h, b h, t b h, k h, b h -> t b h, b h",
    lambda w_h, hs, h0, g_hs, g_h: [(hs.shape, g_hs.dtype), (w_h.shape, g_hs.dtype), (g_h.shape, g_h.dtype)],
    "k h, t b h, b h, t b h, b h -> t b h, k h, b h", {3: 0}, _rnn_weight_gradient, residuals=3, like=1,
    gpu_kernel=_pallas_kernel("rnn_backward", _rnn_weight_gradient))


# --- gradient flow: log10 ||∂L/∂h_t|| for many configurations at once ---------------------------------------------


def _flow_cell(name: str, hidden: int):
    from rnnlab.cells import GRU, LSTM, RNN

    return LSTM(hidden) if name == "lstm" else GRU(hidden) if name == "gru" else RNN(hidden, activation=name)


def _reference_gradflow(w_h, b_h, w_x, b_x, h0, c0, xs, which, *direct, threads, cell, chunk, unroll=1):
    """`rnnlab.gradflow.grad_norms` on XLA, for each configuration c on ``xs[:, which[c]]``: ``[C, T]`` (``chunk``:
    its ``remat``, 0 for none), with its default loss, or (``direct``: one operand ``[C, T, N, H]``) a loss of the
    user's given by its direct cotangents."""
    from rnnlab import gradflow

    rnn = _flow_cell(cell, h0.shape[-1])

    def one(w_h, b_h, w_x, b_x, h0, c0, sequence, *direct):
        params = {"w_x": w_x, "w_h": w_h, rnn.bias_names[0]: b_x, **({"b_h": b_h} if cell == "gru" else {})}
        return gradflow.log_domain_norms(rnn, params, xs[:, sequence], (h0, c0) if cell == "lstm" else h0,
                                         remat=chunk if 0 < chunk < xs.shape[0] else None, unroll=unroll,
                                         direct=direct[0] if direct else None)

    return (jax.vmap(one)(w_h, b_h, w_x, b_x, h0, c0, which, *direct),)


def _flow_shapes(w_h, b_h, w_x, b_x, h0, c0, xs, which, *direct):
    from rnnlab import gradflow  # as `_reference_gradflow`: gradflow imports this module

    return [((w_h.shape[0], xs.shape[0]), gradflow.measure_dtype(xs.dtype))]


_FLOW_LABELS = "b k g, b g, b i g, b g, b n h, b n h, t u n i, b"
gradflow_p = _primitive("rnnlab_gradflow", _reference_gradflow, _flow_shapes, f"{_FLOW_LABELS} -> b t",
                        "rnnlab_gradflow", gpu_steps=gpu_flow_unroll)
#: `gradflow_p` with one more operand, a loss's direct cotangents ``[C, T, N, H]`` (`grad_norms_direct`).
gradflow_direct_p = _primitive("rnnlab_gradflow_direct", _reference_gradflow, _flow_shapes,
                               f"{_FLOW_LABELS}, b t n h -> b t", "rnnlab_gradflow_direct",
                               gpu_steps=gpu_flow_unroll)


def _gradflow_batch(p):
    """vmap of `gradflow_p` (or `gradflow_direct_p`): the mapped axis joins the configurations; mapped inputs join
    the sequences, each example's indices shifted to its own."""

    def rule(args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        per_config, (xs, which), direct = args[:6], args[6:8], args[8:]
        config_dims, (xs_dim, which_dim), direct_dims = dims[:6], dims[6:8], dims[8:]

        def leading(a, d):
            return jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (size,) + a.shape)

        which = leading(which, which_dim)
        if xs_dim is not None:
            xs = jnp.moveaxis(xs, xs_dim, 1)  # [T, size, U, N, I]
            which = which + (jnp.arange(size, dtype=which.dtype) * xs.shape[2])[:, None]
            xs = xs.reshape((xs.shape[0], -1) + xs.shape[3:])
        merged = [leading(a, d) for a, d in zip(per_config + direct, config_dims + direct_dims)]  # [size, C, ...]
        merged = [a.reshape((-1,) + a.shape[2:]) for a in merged]
        (log10_norms,) = p.bind(*merged[:6], xs, which.reshape(-1), *merged[6:], **params)
        return [log10_norms.reshape((size, -1) + log10_norms.shape[1:])], [0]

    return rule


batching.primitive_batchers[gradflow_p] = _gradflow_batch(gradflow_p)
batching.primitive_batchers[gradflow_direct_p] = _gradflow_batch(gradflow_direct_p)


def flow_cell_name(cell) -> str:
    """The gradient-flow kernel's name for a built-in cell (`rnnlab.fused.supports` holds)."""
    from rnnlab.cells import GRU, LSTM

    return "lstm" if type(cell) is LSTM else "gru" if type(cell) is GRU else cell.activation


def grad_norms(cell, params, xs, carry, remat: int | None = None):
    """``log10 ||∂L/∂h_t|| [T]`` for ``L = Σ h_T² / N``: `rnnlab.gradflow.grad_norms` with its default loss, for a
    built-in cell (`rnnlab.fused.supports`) on ``xs [T, N, input_size]`` from ``carry`` (batch flattened to ``N``),
    as one call of `gradflow_p` (``remat``: chunks of that many steps, each run forward again on the way back).
    Under `jax.vmap` (a sweep's configurations) the mapped axis becomes the primitive's configuration axis, which the
    kernel shares out over its threads and `jax.sharding` splits over devices.

    With the sequences split over devices (`jax.sharding`'s explicit mode, where ``xs``'s type splits ``N``, or
    within `split_batch`) each device measures its own in `jax.shard_map` and the devices' norms are combined
    (`_combined_log10_norms`): the loss is a mean over sequences and each sequence's backward pass its own, so the
    squared norms add, and the only traffic is two reductions of ``[T]`` at the end (not the whole batch gathered
    on every device). The rule for undefined gradients then holds per device: where a device's sequences' states
    overflow while their own gradient is exactly zero, the whole's gradient is nan if another device's is not zero
    (as on one device), but the split reports those steps as that device's -inf plus the others' norms."""
    leaves = jax.tree_util.tree_leaves(carry)
    split = _split_of([xs, *leaves], [1] + [0] * len(leaves))
    if split is None:
        return _grad_norms_whole(cell, params, xs, carry, remat)
    mesh, axis, explicit = split
    specs = (PartitionSpec(), PartitionSpec(None, axis), PartitionSpec(axis))  # prefixes of (params, xs, carry)
    operands = (params, xs, carry)
    if explicit:  # the types must match the specs: a carry of zeros is split, the parameters whole
        operands = tuple(jax.sharding.reshard(tree, spec) for tree, spec in zip(operands, specs))
    # Each device's loss divides by its own rows, a `parts`-th of N: its gradient is `parts` times its share.
    parts = _devices_along(mesh, axis)

    def local(p, x, c):
        combined = _combined_log10_norms(_grad_norms_whole(cell, p, x, c, remat), axis)
        return combined - jnp.asarray(np.log10(parts), combined.dtype)

    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(), check_vma=False)(*operands)


def _grad_norms_whole(cell, params, xs, carry, remat, direct=None):
    stacked = jax.tree_util.tree_map(lambda a: a[None], (params, carry, direct))
    return grad_norms_of_configs(cell, *stacked[:2], xs[:, None], jnp.zeros((1,), jnp.int32), remat, stacked[2])[0]


def grad_norms_direct(cell, params, xs, carry, direct, remat: int | None = None):
    """`grad_norms` for a loss of the user's, given by its direct cotangents ``direct [T, N, H]`` (∂L/∂h_t through
    L's own dependence on h_t alone): one call of `gradflow_direct_p`, whose kernel adds each step's to the
    cotangent at the cotangent's log10 scale. Its configurations are not split into teams (every unit's share of
    the direct cotangent's norm would need a barrier); groups of rows as ever. Not split over devices: a batch split
    over devices is gathered."""
    return _grad_norms_whole(cell, params, xs, carry, remat, direct)


def _combined_log10_norms(log10_norms, axis):
    """Within `jax.shard_map` along mesh axis ``axis``, from each device's ``log10`` norms ``[T]`` of its own rows
    those of all rows: squared norms add, so ``m + ½ log10 Σ_d 10^(2 (l_d − m))`` with ``m`` the devices' largest
    (no overflow, exact far beyond float32's range as the norms are). ``-inf`` where every device's is (all zero:
    the sum is 0), nan where any device's is (a state the gradient depends on not finite: nan enters the sum)."""
    top = jax.lax.pmax(log10_norms, axis)
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    return shift + 0.5 * jnp.log10(jax.lax.psum(10.0 ** (2 * (log10_norms - shift)), axis))


def grad_norms_of_configs(cell, params, carry, xs, which, remat: int | None = None, direct=None):
    """``log10 ||∂L/∂h_t|| [C, T]`` of C configurations of a built-in cell in one call of `gradflow_p`: ``params``
    and ``carry`` stacked on a leading axis, configuration c on ``xs[:, which[c]]`` (``xs [T, U, N, input_size]``,
    ``which [C]`` int32): configurations that share inputs read them from one place. ``remat``: a chunk length
    dividing T; the kernel keeps the carry before each chunk and runs the chunk's steps again on the way back.
    ``direct``: a loss of the user's direct cotangents ``[C, T, N, H]`` in place of the default loss
    (`gradflow_direct_p`)."""
    name = flow_cell_name(cell)
    w_h = params["w_h"]
    zeros = jnp.zeros(w_h.shape[:1] + w_h.shape[-1:], w_h.dtype)
    h0, c0 = carry if name == "lstm" else (carry, jnp.zeros_like(carry))
    operands = (w_h, params["b_h"] if name == "gru" else zeros, params["w_x"], params[cell.bias_names[0]], h0, c0, xs,
                jnp.asarray(which, jnp.int32))
    p, operands = (gradflow_p, operands) if direct is None else (gradflow_direct_p, (*operands, direct))
    (log10_norms,) = p.bind(*operands, threads=threads(), cell=name, chunk=int(remat or 0))
    return log10_norms


def _ask(symbol: str, argtypes: list, *args, restype=ctypes.c_int) -> int:
    """``symbol(*args)`` of the kernels' library (how the kernels will share out work, or size it), or 0 where it
    cannot be built (then no kernel runs)."""
    library = _library() if enabled() else None
    if library is None:
        return 0
    function = getattr(library, symbol)
    function.argtypes, function.restype = argtypes, restype
    return function(*args)


def flow_team(cell, configs: int, rows: int) -> int:
    """Threads that split each configuration's hidden units when `gradflow_p` runs ``configs`` configurations of a
    built-in cell on ``rows`` sequences with `threads` threads: 1 (the threads share out the configurations' groups
    of rows, `flow_groups`) unless there is one configuration of fewer than 16 rows and each step holds enough work
    (0 where the library cannot be built); its threads meet at barriers."""
    return _ask("RnnlabFlowTeam", [ctypes.c_char_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int64],
                flow_cell_name(cell).encode(), configs, rows, kernel_hidden(cell.hidden_size), threads())


def cell_split(cell, steps: int, batch: int) -> tuple[int, bool]:
    """How the cell kernels' loops share ``steps`` steps of ``batch`` rows of a built-in cell among `threads`
    threads: ``(parts, by_rows)``, groups of rows each whole on one thread (no barrier; from 8 rows a thread and
    enough work a group) or a team of threads that split the hidden units and meet at a barrier every step (``(0,
    False)`` where the library cannot be built)."""
    parts = _ask("RnnlabCellSplit", [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64], steps,
                 batch, kernel_hidden(cell.hidden_size), len(cell.gates), threads())
    return abs(parts), parts > 0


def steps_aside() -> int:
    """How many times a kernel's thread has moved itself to another CPU since the library was loaded, its helper
    queued behind it on one CPU (see the module's docstring; 0 where the library cannot be built)."""
    return _ask("RnnlabStepsAside", [], restype=ctypes.c_int64)


def flow_groups(rows: int) -> int:
    """Groups of rows `gradflow_p` measures each configuration of ``rows`` sequences in: 8 to 15 rows a group (1
    below 16 rows), each whole on one thread with no barrier, their squared norms added at the end; the same for any
    thread count (0 where the library cannot be built)."""
    return _ask("RnnlabFlowGroups", [ctypes.c_int], rows)


def flow_workspace_bytes(cell, steps: int, rows: int, remat: int | None = None) -> int:
    """Bytes of the gradient-flow kernel's workspace per thread for a configuration of ``rows`` sequences of
    ``steps`` (the carries, what each step's Jacobian needs, per-step rows; with ``remat``, the carry before each
    chunk and one chunk's): each thread measuring groups of rows (`flow_groups`) keeps one, the largest group's,
    from one group to its next; a team that splits a configuration's units (`flow_team`) shares one. Outside XLA's
    memory accounting, freed when the call returns. Asked of the library itself (0 where it cannot be built: then no
    kernel runs)."""
    return 4 * _ask("RnnlabFlowWorkspaceFloats", [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                                  ctypes.c_int], flow_cell_name(cell).encode(), steps, rows,
                    kernel_hidden(cell.hidden_size), int(remat or 0), restype=ctypes.c_int64)


# `custom_partitioning` needs the devices while lowering, which JAX provides to programs holding a primitive of this
# (private) registry; without it the kernels still run, gathered whole on every device.
try:
    from jax._src import dispatch as _dispatch

    _dispatch.prim_requires_devices_during_lowering.update(
        {lstm_forward_p, lstm_backward_p, gru_forward_p, gru_backward_p, rnn_forward_p, rnn_backward_p, gradflow_p,
         lstm_forward_masked_p, lstm_backward_masked_p, gru_forward_masked_p, gru_backward_masked_p,
         rnn_forward_masked_p, rnn_backward_masked_p, gradflow_direct_p, lstm_infer_p,
         lstm_forward_inputs_p, gru_forward_inputs_p, lstm_infer_masked_p, lstm_forward_inputs_masked_p,
         gru_forward_inputs_masked_p})
except (ImportError, AttributeError):  # pragma: no cover - a JAX without the registry
    pass


#: Below this many rows the kernels leave W_h's gradient to XLA: with a short sum per step (K = batch) the kernel's
#: per-step accumulation was slower than XLA's one matmul after the loop (2026-11-25: LSTM at batch 16, T 1000, 88
#: against 84 ms), so it was 32. Since the sums run packed over several steps at a time, and the GRU's carries b_h's
#: gradient too (which XLA formed from a copy of the saved gates), the kernels are faster from 16 rows
#: (`benchmarks/probe_weight_grad.py`, 2026-11-27 22:55, XLA / kernel: 1.13, 1.31 and 1.27 for the LSTM, GRU and tanh
#: RNN at 16,1000,32,128; 1.06, 1.12, 1.01 at 16,500,64,256); at 8 rows mixed (0.96-1.11 at 8,2000,32,128,
#: 1.01-1.07 at 8,500,32,512), at 4 the same within noise (GRU 0.92, the others 1.00-1.02).
MIN_ROWS_FOR_WEIGHT_GRAD = 16

#: Cells whose W_h gradient XLA forms at any row count where the kernels are built without AVX-512 (8-float
#: vectors). Measured on a 2-core AVX2 CPU, 2026-11-26, ms per LSTM gradient, kernel sum against XLA's matmul,
#: medians of two runs: 330-430 against 300-380 at 64,200,128,256 and 650-660 against 590-620 at 128,50,256,512
#: (equal at 32,100,64,128). The GRU's kernel sum was faster at 64,200,128,256 and undecided at 128,50,256,512, the
#: tanh RNN's 13-25 % faster (benchmarks/README.md). With the sums packed and run over several steps at a time
#: (since the afternoon), interleaved in one process: LSTM 29 / 394 / 627 ms against XLA's 25 / 344 / 614 at
#: 32,100,64,128 / 64,200,128,256 / 128,50,256,512, still XLA's; the GRU's 12 % and the RNN's 19-23 % faster at the
#: two larger shapes.
XLA_WEIGHT_GRAD_WITHOUT_AVX512 = frozenset({"lstm"})


def vector_lanes() -> int:
    """Floats per vector in the built kernels: 16 with AVX-512, else 8 (0 where they cannot be built)."""
    return _ask("RnnlabVectorLanes", [])


def weight_grad_mode(cell: str, rows: int) -> str:
    """Where the backward kernel of ``cell`` (``"lstm"``, ``"gru"``, ``"rnn"``) over ``rows`` sequences has W_h's
    gradient (the GRU's with b_h's) formed: ``"kernel"`` (summed in its loop) or ``"xla"`` (one matmul after it)."""
    if rows < MIN_ROWS_FOR_WEIGHT_GRAD:
        return "xla"
    if cell in XLA_WEIGHT_GRAD_WITHOUT_AVX512 and vector_lanes() < 16:
        return "xla"
    return "kernel"
