"""Probe (GPU): the plain tanh RNN's recurrences (forward and backward) as Mosaic GPU kernels, beside the landed
Triton kernels (`rnnlab.native.pallas.rnn_forward`, `rnn_backward`) and XLA's loops, to decide whether porting the
kernels to Mosaic GPU (Pallas's other GPU backend; its Triton backend is deprecated from jax 0.11, and only Mosaic
GPU reaches Hopper's thread-block clusters, the next step for the teams) costs or gains speed.

The kernels: one program (a CUDA block of one warpgroup) per `ROWS` rows runs all ``T`` steps, ``W_h`` copied once
into shared memory. Forward (`mosaic_rnn_forward`): each step's ``h_{t-1} W_h`` is one ``wgmma`` (TF32 tensor cores,
float32 accumulator) reading ``h_{t-1}`` and ``W_h`` from shared memory; ``h_t = tanh(px_t + h_{t-1} W_h)`` is
computed in registers, stored into shared memory for the next step's matmul and copied from there to ``hs[t]`` by
the TMA unit, asynchronously; while the ``wgmma`` runs, ``px_{t+1}``'s fetch (TMA) is issued and ``px_t`` read
into registers; two buffers each for ``h`` and ``px``. Backward (`mosaic_rnn_backward`), from the last step to the
first: ``g_z_t = (g_hs_t + λ) ⊙ (1 - h_t²)`` stored into shared memory, whence the TMA copies it to ``g_z[t]`` and
the ``wgmma`` computes ``λ ← g_z_t W_hᵀ``; ``hs`` and ``g_hs`` fetched two steps ahead (two buffers each) and the next
step's read into registers while the ``wgmma`` runs; ``g_z`` in one buffer (at hidden 128 a second would not fit
beside them: 227 KB of shared memory a block on an H100). (Both overlaps as a review proposed, which found the
ordering right by the PTX memory model and the primitives' lowering: `commit_smem` is a proxy fence and a warpgroup
barrier, each TMA store its own bulk group, barrier parity tracked per wait inside the loop.)

Constraints of Mosaic GPU this design meets: a ``wgmma`` takes 64 rows at least (``M``), so a program has 64 rows,
the batch padded with zero rows (at batch 16, 4x the elementwise work of a Triton program's 16 rows); float32
operands only from shared memory (not registers) and K-major, so ``W_h`` goes in transposed and is read through
`plgpu.transpose_ref` (``W_h`` as it is, backward); hidden a multiple of 32, at most 128 (``W_h`` in 64 KB). Unlike
the Triton kernels they have no "highest" precision (no float32 ``wgmma``): every way is compared at its default
(TF32 on a GPU) against float64.

What runs where:
- ``--check`` (any machine; jax ≥ 0.10.2, whose interpreter takes an indexed barrier): both kernels in Mosaic GPU's
  interpreter (`InterpretGPUParams`: a simulated GPU, its shared memory, barriers, TMA copies and ``wgmma``; race
  detection on) against a float64 loop, at a few batch and step counts. The interpreter's ``wgmma`` takes no
  transposed operand and it has no `plgpu.layout_cast`, so there ``W_h`` goes in already transposed for the
  ``wgmma`` and the backward's first ``λ`` is not cast: the lines that differ from the GPU's kernels.
- ``--lower`` (any machine): the GPU's kernels lowered for CUDA (Mosaic GPU's MLIR, which the GPU compiles to PTX),
  each holding a TF32 ``wgmma``, and each forward variant. The lowering checks that shared memory suffices.
- no flag (a GPU): each shape timed as `bench_cells.py` times (`blocked_medians`): forward+backward and forward
  alone, three ways: these kernels, the Triton kernels, XLA's loops (the primitives' references, as rnnlab runs
  them with ``RNNLAB_PALLAS=0``); each way's largest difference from float64. Then the forward's `VARIANTS` (parts
  of its step left out, or approximate ``tanh``) at `VARIANT_CASES`, and the Triton forward's (`TRITON_VARIANTS`) at
  the first: µs a step each. A way that fails to compile is reported and the others timed.

`tests/test_native.py` runs ``--lower`` and ``--check``. Not run by `make bench`; `benchmarks/gpu.sh` runs it (part
``mosaic``).

    python benchmarks/probe_mosaic_rnn.py [--check | --lower]
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys

import jax
import jax.numpy as jnp
import numpy as np

#: Rows per program: the fewest a ``wgmma`` takes.
ROWS = 64
#: (batch, T, hidden) timed on a GPU: the long thin shape where the tanh RNN's forward+backward is at 0.58-0.65x of
#: cuDNN (run 9), wider batches, and hidden 64.
CASES = ((16, 1000, 128), (64, 1000, 128), (256, 1000, 128), (16, 1000, 64), (64, 200, 128))


def _transforms(width: int):
    """Shared-memory tiling and swizzle for a float32 ``wgmma`` operand whose rows are ``width`` long."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    swizzle = 128  # bytes: 32 float32
    if width % (swizzle // 4):
        raise ValueError(f"hidden must be a multiple of {swizzle // 4}, got {width}")
    return plgpu.TilingTransform((8, swizzle // 4)), plgpu.SwizzleTransform(swizzle)


def _kernel(body, out, scratch, **params):
    """`plgpu.kernel` with outputs ``out`` and scratch ``scratch``, named as this JAX names them (``out_type``,
    ``scratch_types`` from jax 0.10.2; ``out_shape``, ``scratch_shapes`` before)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if "out_type" in inspect.signature(plgpu.kernel).parameters:
        return plgpu.kernel(body, out_type=out, scratch_types=scratch, **params)
    return plgpu.kernel(body, out_shape=out, scratch_shapes=scratch, **params)


def mosaic_rnn_forward(w_h, h0, px, interpret=None, without: frozenset = frozenset(), approx: bool = False):
    """``hs [T, B, H]`` of ``h_t = tanh(px_t + h_{t-1} W_h)`` (``w_h [H, H]``, ``h0 [B, H]``, ``px [T, B, H]``),
    as a Mosaic GPU kernel; ``interpret``: an `InterpretGPUParams`, to run it in Mosaic GPU's interpreter.

    To see where a step's time goes (`VARIANTS`, timed only; their results are wrong): ``without`` some of
    ``"hs copy"`` (no TMA copy of ``h_t`` to ``hs``), ``"px"`` (no ``px`` fetched or read) and ``"wgmma"`` (no matmul:
    ``h_t = tanh(px_t)``); ``approx``: Mosaic GPU's approximate math (``tanh.approx.f32``)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    steps, batch, hidden = px.shape
    if w_h.shape != (hidden, hidden) or h0.shape != (batch, hidden):
        raise ValueError(f"w_h must be [H, H] = {(hidden, hidden)} and h0 [B, H] = {(batch, hidden)}, "
                         f"got {w_h.shape} and {h0.shape}")
    padded = -(-batch // ROWS) * ROWS
    h0 = jnp.pad(h0, ((0, padded - batch), (0, 0)))
    px = jnp.pad(px, ((0, 0), (0, padded - batch), (0, 0)))
    transposed = interpret is None  # the interpreter's wgmma takes no transposed operand
    transforms = _transforms(hidden)

    def body(w_gmem, h0_gmem, px_gmem, hs_gmem, w_smem, h_smem, px_smem, w_ready, h0_ready, px_ready):
        rows = pl.ds(jax.lax.axis_index("rows") * ROWS, ROWS)
        plgpu.copy_gmem_to_smem(w_gmem, w_smem, w_ready)
        plgpu.copy_gmem_to_smem(h0_gmem.at[rows], h_smem.at[0], h0_ready)
        if "px" not in without:
            plgpu.copy_gmem_to_smem(px_gmem.at[0, rows], px_smem.at[0], px_ready.at[0])
        plgpu.barrier_wait(w_ready)
        plgpu.barrier_wait(h0_ready)
        w = plgpu.transpose_ref(w_smem, (1, 0)) if transposed else w_smem  # [K, N] = W_h either way

        def step(t, carry):
            slot = jax.lax.rem(t, 2)
            other = 1 - slot  # px_smem[other] was read (into registers) last step, before its commit_smem

            def matmul(acc):  # while the wgmma runs: the next step's px fetched, this step's read
                if "wgmma" not in without:
                    plgpu.wgmma(acc, h_smem.at[slot], w)
                if "px" in without:
                    return acc[...]

                @pl.when(t + 1 < steps)
                def _():
                    plgpu.copy_gmem_to_smem(px_gmem.at[t + 1, rows], px_smem.at[other], px_ready.at[other])

                plgpu.barrier_wait(px_ready.at[slot])
                px_t = px_smem[slot]
                return acc[...] + px_t  # waits for the wgmma

            h = jnp.tanh(pl.run_scoped(matmul, plgpu.ACC((ROWS, hidden), jnp.float32)))
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # h_smem[other]'s copy of two steps ago has read it
            h_smem[other] = h
            plgpu.commit_smem()  # visible to the next wgmma and to the TMA copy
            if "hs copy" not in without:
                plgpu.copy_smem_to_gmem(h_smem.at[other], hs_gmem.at[t, rows])
            return carry

        jax.lax.fori_loop(0, steps, step, 0)
        plgpu.wait_smem_to_gmem(0)

    kernel = _kernel(
        body, jax.ShapeDtypeStruct((steps, padded, hidden), jnp.float32),
        [plgpu.SMEM((hidden, hidden), jnp.float32, transforms=transforms),
                       plgpu.SMEM((2, ROWS, hidden), jnp.float32, transforms=transforms),
                       plgpu.SMEM((2, ROWS, hidden), jnp.float32, transforms=transforms),
                       plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=1),
                       plgpu.Barrier(num_arrivals=1, num_barriers=2)],
        grid=(padded // ROWS,), grid_names=("rows",), interpret=interpret,
        **({"compiler_params": plgpu.CompilerParams(approx_math=True)} if approx else {}))
    return kernel(w_h.T if transposed else w_h, h0, px)[:, :batch]


def mosaic_rnn_backward(w_h, hs, g_hs, g_h, interpret=None):
    """``[g_z [T, B, H], g_h0 [B, H]]`` (as `rnnlab.native.pallas.rnn_backward`): the cotangents of ``px`` and ``h0``
    given those of ``hs`` and of the last carry, run from the last step to the first: ``g_z_t = (g_hs_t + λ) ⊙ (1 -
    h_t²)`` and ``λ ← g_z_t W_hᵀ``, one ``wgmma`` a step reading ``g_z_t`` from shared memory, where it is stored for
    the TMA copy to ``g_z[t]`` anyway; ``hs[t - 1]`` and ``g_hs[t - 1]`` fetched while step ``t`` runs."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    steps, batch, hidden = hs.shape
    padded = -(-batch // ROWS) * ROWS
    hs, g_hs = (jnp.pad(a, ((0, 0), (0, padded - batch), (0, 0))) for a in (hs, g_hs))
    g_h = jnp.pad(g_h, ((0, padded - batch), (0, 0)))
    transposed = interpret is None
    transforms = _transforms(hidden)

    def body(w_gmem, hs_gmem, g_hs_gmem, g_h_gmem, g_z_gmem, g_h0_gmem, w_smem, g_smem, hs_smem, g_hs_smem,
             w_ready, carry_ready, hs_ready, g_hs_ready):
        rows = pl.ds(jax.lax.axis_index("rows") * ROWS, ROWS)

        def fetch(t, slot):
            plgpu.copy_gmem_to_smem(hs_gmem.at[t, rows], hs_smem.at[slot], hs_ready.at[slot])
            plgpu.copy_gmem_to_smem(g_hs_gmem.at[t, rows], g_hs_smem.at[slot], g_hs_ready.at[slot])

        def inputs(slot):  # a step's h_t and g_hs_t, into registers, once fetched
            plgpu.barrier_wait(hs_ready.at[slot])
            plgpu.barrier_wait(g_hs_ready.at[slot])
            return hs_smem[slot], g_hs_smem[slot]

        plgpu.copy_gmem_to_smem(w_gmem, w_smem, w_ready)
        plgpu.copy_gmem_to_smem(g_h_gmem.at[rows], g_smem, carry_ready)
        for s in range(min(2, steps)):  # two steps ahead: step s's inputs in buffer s % 2
            fetch(steps - 1 - s, s)
        plgpu.barrier_wait(w_ready)
        plgpu.barrier_wait(carry_ready)
        w = plgpu.transpose_ref(w_smem, (1, 0)) if transposed else w_smem  # [K, N] = W_hᵀ either way
        start = g_smem[...]  # in the accumulator's layout, as the loop carries it (the interpreter has none)
        start = start if interpret else plgpu.layout_cast(start, plgpu.Layout.WGMMA)

        def step(s, state, last=False):
            """Step ``s`` (time ``t``), its inputs in registers (``state``: λ, h_t, g_hs_t), and, but at the last,
            the next step's inputs read while its wgmma runs."""
            carry, h, g_hs_t = state
            t, slot = steps - 1 - s, jax.lax.rem(s, 2)

            @pl.when(t >= 2)
            def _():
                fetch(t - 2, slot)  # read into registers last step, before its commit_smem

            g_z = (g_hs_t + carry) * (1.0 - h * h)
            # One buffer for g_z (shared memory holds no second beside W_h and the inputs' two at hidden 128):
            # last step's copy to g_z[t + 1], issued a matmul ago, must have read it.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            g_smem[...] = g_z
            plgpu.commit_smem()  # visible to the wgmma and to the TMA copy
            plgpu.copy_smem_to_gmem(g_smem, g_z_gmem.at[t, rows])

            def matmul(acc):
                plgpu.wgmma(acc, g_smem, w)
                upcoming = () if last else inputs(1 - slot)
                return acc[...], *upcoming  # waits for the wgmma

            return pl.run_scoped(matmul, plgpu.ACC((ROWS, hidden), jnp.float32))

        state = jax.lax.fori_loop(0, steps - 1, step, (start, *inputs(0)))
        (carry,) = step(steps - 1, state, last=True)
        plgpu.wait_smem_to_gmem(0)
        g_smem[...] = carry
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(g_smem, g_h0_gmem.at[rows])
        plgpu.wait_smem_to_gmem(0)

    sequence = jax.ShapeDtypeStruct((steps, padded, hidden), jnp.float32)
    kernel = _kernel(
        body, (sequence, jax.ShapeDtypeStruct((padded, hidden), jnp.float32)),
        [plgpu.SMEM((hidden, hidden), jnp.float32, transforms=transforms),
                       plgpu.SMEM((ROWS, hidden), jnp.float32, transforms=transforms),
                       *[plgpu.SMEM((2, ROWS, hidden), jnp.float32, transforms=transforms)] * 2,
                       plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=1),
                       plgpu.Barrier(num_arrivals=1, num_barriers=2), plgpu.Barrier(num_arrivals=1, num_barriers=2)],
        grid=(padded // ROWS,), grid_names=("rows",), interpret=interpret)
    g_z, g_h0 = kernel(w_h if transposed else w_h.T, hs, g_hs, g_h)
    return [g_z[:, :batch], g_h0[:batch]]


def xla_rnn_forward(w_h, h0, px):
    """``hs`` by the loop rnnlab runs where no kernel applies (``RNNLAB_PALLAS=0``): the forward primitive's
    reference, a `lax.scan` of `rnnlab.fused`'s step, unrolled as on a GPU (`native.gpu_unroll`)."""
    from rnnlab import native

    return native._reference_rnn_forward(w_h, h0, px, reverse=False, threads=1, activation="tanh",
                                         unroll=native.gpu_unroll())[0]


def xla_rnn_backward(w_h, hs, g_hs, g_h):
    """``[g_z, g_h0]`` by the backward primitive's reference where no kernel applies: the transpose of its tangent
    loop (`native._reference_rnn_tangent`, ``W_h``'s tangent zero: its gradient is not timed) in ``u`` and ``dh0``."""
    from rnnlab import native

    def tangent(u, dh0):
        return native._reference_rnn_tangent(w_h, hs, jnp.zeros_like(g_h), u, jnp.zeros_like(w_h), dh0, reverse=False,
                                             threads=1, activation="tanh", unroll=native.gpu_unroll())

    return list(jax.linear_transpose(tangent, hs, g_h)((g_hs, g_h)))


def triton_rnn_forward(w_h, h0, px):
    from rnnlab.native import pallas

    return pallas.rnn_forward(w_h, h0, px, reverse=False, activation="tanh")[0]


def triton_rnn_backward(w_h, hs, g_hs, g_h):
    from rnnlab.native import pallas

    return pallas.rnn_backward(w_h, hs, None, g_hs, g_h, reverse=False, activation="tanh")


def problem(batch: int, steps: int, hidden: int, seed: int = 0):
    """``w_h, h0, px`` and cotangents ``g_hs, g_h``, from normal draws (``W_h`` scaled by 1/√H)."""
    keys = jax.random.split(jax.random.key(seed), 5)
    w_h = jax.random.normal(keys[0], (hidden, hidden)) / np.sqrt(hidden)
    h0, g_h = (jax.random.normal(key, (batch, hidden)) for key in keys[1:3])
    px, g_hs = (jax.random.normal(key, (steps, batch, hidden)) for key in keys[3:])
    return w_h, h0, px, g_hs, g_h


def truth(w_h, h0, px, g_hs, g_h) -> list:
    """``[hs, g_z, g_h0]`` in float64 (numpy, a loop of its own): what every result is measured against."""
    w_h, h, px, g_hs, carry = (np.asarray(a, np.float64) for a in (w_h, h0, px, g_hs, g_h))
    hs = []
    for px_t in px:
        h = np.tanh(px_t + h @ w_h)
        hs.append(h)
    g_z = [None] * len(hs)
    for t in reversed(range(len(hs))):
        g_z[t] = (g_hs[t] + carry) * (1.0 - hs[t] ** 2)
        carry = g_z[t] @ w_h.T
    return [np.stack(hs), np.stack(g_z), carry]


def both(forward, backward):
    """``[hs, g_z, g_h0]`` of one forward and one backward recurrence (the backward on the forward's ``hs``)."""
    def run(w_h, h0, px, g_hs, g_h):
        hs = forward(w_h, h0, px)
        return [hs, *backward(w_h, hs, g_hs, g_h)]
    return run


def _largest_error(got, want) -> float:
    """The largest difference of ``got`` from ``want`` relative to ``want``'s largest element, over the results."""
    return max(float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b))) for a, b in zip(got, want))


def check() -> None:
    """Both kernels in Mosaic GPU's interpreter against float64, each result within 1e-5 of it relative to its
    largest element (the interpreter's matmul is float32; on a GPU it is TF32), with the interpreter's race
    detection on. Planting faults showed what this sees: without the wait on ``px``'s copy the run fails; a missing
    `commit_smem` or `wait_smem_to_gmem` it does not see (its copies and wgmma complete at once), so those are
    ordered here by reading and only a GPU tests them."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    params = InterpretGPUParams(detect_races=True)
    forward = functools.partial(mosaic_rnn_forward, interpret=params)
    backward = functools.partial(mosaic_rnn_backward, interpret=params)
    for batch, steps, hidden in ((16, 5, 64), (70, 4, 32), (3, 3, 128), (5, 2, 32), (5, 1, 32)):
        args = problem(batch, steps, hidden)
        got = both(forward, backward)(*args)
        error, races = _largest_error(got, truth(*args)), get_races().races_found
        print(f"interpreter, batch {batch}, T {steps}, hidden {hidden}: largest difference from float64 "
              f"{error:.2e} (relative), races found: {races}", flush=True)
        assert [a.shape for a in got] == [(steps, batch, hidden)] * 2 + [(batch, hidden)], [a.shape for a in got]
        assert error < 1e-5 and not races, (error, races)


#: The forward kernel's variants timed on a GPU at `VARIANT_CASES` (`mosaic_rnn_forward`'s ``without`` and
#: ``approx``): what each part of a step costs.
VARIANTS = {"as is": {}, "no hs copy": {"without": frozenset({"hs copy"})}, "no px": {"without": frozenset({"px"})},
            "no wgmma": {"without": frozenset({"wgmma"})}, "approx. tanh": {"approx": True}}
VARIANT_CASES = ((16, 1000, 128), (64, 1000, 128))
#: The landed Triton forward kernel's variants, timed beside them at the first of `VARIANT_CASES` (`triton_variant`).
TRITON_VARIANTS = ("as is", "linear (no tanh)", "no px read", "no dot")


@contextlib.contextmanager
def triton_variant(name: str):
    """`rnnlab.native.pallas` changed, while a call is traced, to leave out a part of the Triton forward kernel's step
    (its results wrong; timed only): ``no px read`` (each step's inputs zeros, not loaded), ``no dot`` (``h W_h``
    zeros: no matmul, and no layout change of ``h`` for it); ``linear (no tanh)`` is the kernel with the linear
    activation (`triton_forward_of`)."""
    from rnnlab.native import pallas

    saved = pallas._times_w, pallas._Team.load
    if name == "no dot":
        pallas._times_w = lambda h, ws: [jnp.zeros((h.shape[0], w.shape[-1]), jnp.float32) for w in ws]
    elif name == "no px read":
        pallas._Team.load = lambda self, ref, t=None, gates=1: [jnp.zeros((pallas.ROWS, self.units), jnp.float32)
                                                                 for _ in range(gates)]
    try:
        yield
    finally:
        pallas._times_w, pallas._Team.load = saved


def triton_forward_of(name: str):
    """The Triton forward kernel as variant ``name``, jitted and traced (by a first call) within `triton_variant`."""
    from rnnlab.native import pallas

    activation = "linear" if name == "linear (no tanh)" else "tanh"
    forward = jax.jit(lambda w_h, h0, px: pallas.rnn_forward(w_h, h0, px, reverse=False, activation=activation)[0])

    def call(*args):
        with triton_variant(name):
            return forward(*args)
    return call


def lower() -> None:
    """The GPU's kernels lowered for CUDA: two Mosaic GPU calls, each holding a TF32 wgmma of 64 rows; and each
    forward variant, a program of its own (all but ``no wgmma`` with the wgmma)."""
    args = problem(16, 8, 128)
    text = jax.jit(both(mosaic_rnn_forward, mosaic_rnn_backward)).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    wgmma = "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32"
    calls, tf32 = text.count("stablehlo.custom_call @mosaic_gpu"), text.count(wgmma)
    print(f"lowered for CUDA: {calls} Mosaic GPU calls, {tf32} holding a TF32 wgmma m64n128k8")
    assert calls == 2 and tf32 == 2
    texts = {name: jax.jit(functools.partial(mosaic_rnn_forward, **params)).trace(*args[:3]).lower(
        lowering_platforms=("cuda",)).as_text() for name, params in VARIANTS.items()}
    for name, variant in texts.items():
        print(f"variant {name}: lowered, wgmma {wgmma in variant}")
        assert (wgmma in variant) == (name != "no wgmma")
    assert len(set(texts.values())) == len(texts), "two variants lowered to one program"
    from rnnlab.native import pallas

    if pallas._compiler_params() is not None:  # a Pallas that lowers to Triton
        triton = {name: jax.jit(triton_forward_of(name)).trace(*args[:3]).lower(lowering_platforms=("cuda",)).as_text()
                  for name in TRITON_VARIANTS}
        print("Triton variants lowered:", ", ".join(triton))
        assert len(set(triton.values())) == len(triton), "two Triton variants lowered to one program"


WAYS = {"Mosaic GPU": (mosaic_rnn_forward, mosaic_rnn_backward),
        "Triton (landed)": (triton_rnn_forward, triton_rnn_backward),
        "XLA loop": (xla_rnn_forward, xla_rnn_backward)}


def main() -> None:
    from bench_cells import _ms, _table, blocked_medians

    print(f"probe_mosaic_rnn: jax {jax.__version__} ({jax.default_backend()}, {jax.devices()[0].device_kind})")
    rows = []
    for batch, steps, hidden in CASES:
        args = problem(batch, steps, hidden)
        want = truth(*args)
        calls, errors = {}, {}
        for name, (forward, backward) in WAYS.items():
            whole, alone = jax.jit(both(forward, backward)), jax.jit(forward)
            try:
                errors[name] = f"{_largest_error(whole(*args), want):.1e}"
            except Exception as error:  # a kernel that does not compile here: said, and the others timed
                errors[name] = f"failed: {type(error).__name__}"
                print(f"{name} at {batch},{steps},{hidden} failed: {str(error)[:2000]}", flush=True)
                continue
            calls[name] = lambda f=whole: jax.block_until_ready(f(*args))
            calls[f"{name}, forward"] = lambda f=alone: jax.block_until_ready(f(*args[:3]))
        medians, fastest, _ = blocked_medians(calls)

        def timed(name):
            return f"{_ms(medians[name])} ({_ms(fastest[name])})" if name in medians else "—"

        ratio = (f"{medians['Triton (landed)'] / medians['Mosaic GPU']:.2f}x"
                 if {"Mosaic GPU", "Triton (landed)"} <= medians.keys() else "—")
        rows.append([f"{batch},{steps},{hidden}"] + [timed(n) for n in WAYS] + [timed(f"{n}, forward") for n in WAYS]
                    + [ratio, f"{medians['Mosaic GPU'] / (2 * steps) * 1e6:.2f}" if "Mosaic GPU" in medians else "—"]
                    + [errors[n] for n in WAYS])
        print(*rows[-1], sep=" | ", flush=True)
    _table(("batch,T,hidden", *(f"{n} fwd+bwd, median (fastest)" for n in WAYS), *(f"{n} fwd" for n in WAYS),
            "Triton / Mosaic (fwd+bwd)", "Mosaic µs a step (fwd+bwd)",
            *(f"{n}: largest diff. from float64 (relative)" for n in WAYS)), rows)
    print("\nThe Mosaic GPU forward without parts of its step (wrong results; timed only): µs a step")
    rows = []
    for batch, steps, hidden in VARIANT_CASES:
        args = problem(batch, steps, hidden)[:3]
        calls = {}
        for name, params in VARIANTS.items():
            forward = jax.jit(functools.partial(mosaic_rnn_forward, **params))
            try:
                jax.block_until_ready(forward(*args))
            except Exception as error:
                print(f"variant {name} at {batch},{steps},{hidden} failed: {str(error)[:2000]}", flush=True)
                continue
            calls[name] = lambda f=forward: jax.block_until_ready(f(*args))
        if (batch, steps, hidden) == VARIANT_CASES[0]:
            for name in TRITON_VARIANTS:
                forward = triton_forward_of(name)
                jax.block_until_ready(forward(*args))
                calls[f"Triton {name}"] = lambda f=forward: jax.block_until_ready(f(*args))
        medians, _, _ = blocked_medians(calls)
        names = [*VARIANTS, *(f"Triton {name}" for name in TRITON_VARIANTS)]
        rows.append([f"{batch},{steps},{hidden}"] + [f"{medians[n] / steps * 1e6:.2f}" if n in medians else "—"
                                                     for n in names])
        print(*rows[-1], sep=" | ", flush=True)
    _table(("batch,T,hidden", *(f"Mosaic {n}" for n in VARIANTS), *(f"Triton {n}" for n in TRITON_VARIANTS)), rows)


if __name__ == "__main__":
    {"--check": check, "--lower": lower}.get(next(iter(sys.argv[1:]), ""), main)()
