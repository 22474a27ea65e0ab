"""Probe: LSTM forward over 4 cooperating Pallas programs, each holding one gate's W_h block [H, H] in registers;
every step they exchange their gates through global memory and meet at a spin barrier (an atomic counter)."""
import functools
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def _kernel(w_ref, h0_ref, c0_ref, px_ref, cnt_in_ref, hs_ref, cs_ref, g_ref, cnt_ref, *, steps, hidden, precision):
    del cnt_in_ref  # aliased to cnt_ref
    H = hidden
    k = pl.program_id(0)
    w = w_ref[...]  # this program's gate block, held

    def read_counter(_):
        return pltriton.atomic_add(cnt_ref, (0,), jnp.int32(0))

    def step(t, carry):
        h, c = carry
        z = px_ref[t, :, :] + jnp.dot(h, w, precision=precision, preferred_element_type=jnp.float32)
        a = jnp.where(k == 2, jnp.tanh(z), jax.nn.sigmoid(z))
        g_ref[t, :, pl.ds(k * H, H)] = a
        pltriton.debug_barrier()
        pltriton.atomic_add(cnt_ref, (0,), jnp.int32(1))
        target = 4 * (t + 1)
        jax.lax.while_loop(lambda v: v < target, read_counter, read_counter(0))
        pltriton.debug_barrier()
        i, f, g, o = (pltriton.load(g_ref.at[t, :, pl.ds(j * H, H)], volatile=True) for j in range(4))
        c = f * c + i * g
        h = o * jnp.tanh(c)

        @pl.when(k == 0)
        def _():
            hs_ref[t, :, :] = h
            cs_ref[t, :, :] = c

        return h, c

    jax.lax.fori_loop(0, steps, step, (h0_ref[...], c0_ref[...]))


def lstm_forward(w_h, h0, c0, px, *, precision=None, num_warps=4):
    T, B, G = px.shape
    H = G // 4
    kernel = functools.partial(_kernel, steps=T, hidden=H, precision=precision)
    full = lambda shape: pl.BlockSpec(shape, lambda k: (0,) * len(shape))
    f32 = jnp.float32
    counter = jnp.zeros((16,), jnp.int32)
    hs, cs, gates, _ = pl.pallas_call(
        kernel, grid=(4,),
        in_specs=[pl.BlockSpec((H, H), lambda k: (0, k)), full((B, H)), full((B, H)),
                  pl.BlockSpec((T, B, H), lambda k: (0, 0, k)), full((16,))],
        out_specs=[full((T, B, H)), full((T, B, H)), full((T, B, G)), full((16,))],
        out_shape=[jax.ShapeDtypeStruct((T, B, H), f32), jax.ShapeDtypeStruct((T, B, H), f32),
                   jax.ShapeDtypeStruct((T, B, G), f32), jax.ShapeDtypeStruct((16,), jnp.int32)],
        input_output_aliases={4: 3},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1))(w_h, h0, c0, px, counter)
    return hs, cs, gates


if __name__ == "__main__":
    import statistics, sys, time
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import pallas_rnn as pr
    gpu = jax.default_backend() == "gpu"
    T, B, H = (1000, 16, 128)
    w, h0, c0, px = pr.inputs(T, B, H, 4)
    if not gpu:
        low = jax.jit(lstm_forward).trace(w, h0, c0, px).lower(lowering_platforms=("cuda",))
        print("lowered for cuda", low.as_text().count("triton"))
        sys.exit()
    HI = jax.lax.Precision.HIGHEST
    for warps in (4, 8):
        f = jax.jit(functools.partial(lstm_forward, precision=HI, num_warps=warps))
        got = f(w, h0, c0, px)
        want = jax.jit(functools.partial(pr.lstm_reference, precision=HI))(w, h0, c0, px)
        print(f"warps {warps}: max abs err hs {float(jnp.max(jnp.abs(got[0] - want[0]))):.2e}, "
              f"cs {float(jnp.max(jnp.abs(got[1] - want[1]))):.2e}, gates {float(jnp.max(jnp.abs(got[2] - want[2]))):.2e}",
              flush=True)
        calls = {"coop": jax.jit(functools.partial(lstm_forward, num_warps=warps)),
                 "xla scan unroll 8": jax.jit(pr.lstm_reference)}
        for name, fn in calls.items():
            jax.block_until_ready(fn(w, h0, c0, px))
            ts = []
            for _ in range(15):
                s = time.perf_counter(); jax.block_until_ready(fn(w, h0, c0, px)); ts.append(time.perf_counter() - s)
            print(f"  forward {name}: {statistics.median(ts) * 1e3:.3f} ms = {statistics.median(ts) / T * 1e6:.2f} us/step",
                  flush=True)
