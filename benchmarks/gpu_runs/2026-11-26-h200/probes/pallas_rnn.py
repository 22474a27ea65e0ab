"""Probe: one Pallas (Triton) program per 16 batch rows runs a whole recurrence, W_h read from L2 each step."""
import functools
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

ROWS = 16


def _lstm_kernel(w_ref, h0_ref, c0_ref, px_ref, hs_ref, cs_ref, g_ref, *, steps, hidden, precision):
    H = hidden

    def step(t, carry):
        h, c = carry
        z = [px_ref[t, :, pl.ds(k * H, H)] + jnp.dot(h, w_ref[:, pl.ds(k * H, H)], precision=precision,
                                                     preferred_element_type=jnp.float32) for k in range(4)]
        i, f, g, o = jax.nn.sigmoid(z[0]), jax.nn.sigmoid(z[1]), jnp.tanh(z[2]), jax.nn.sigmoid(z[3])
        c = f * c + i * g
        h = o * jnp.tanh(c)
        hs_ref[t, :, :] = h
        cs_ref[t, :, :] = c
        for k, v in enumerate((i, f, g, o)):
            g_ref[t, :, pl.ds(k * H, H)] = v
        return h, c

    jax.lax.fori_loop(0, steps, step, (h0_ref[...], c0_ref[...]))


def _rnn_kernel(w_ref, h0_ref, px_ref, hs_ref, *, steps, hidden, precision, hoist=False):
    w_held = w_ref[...] if hoist else None

    def step(t, h):
        w = w_held if hoist else w_ref[...]
        h = jnp.tanh(px_ref[t, :, :] + jnp.dot(h, w, precision=precision,
                                               preferred_element_type=jnp.float32))
        hs_ref[t, :, :] = h
        return h

    jax.lax.fori_loop(0, steps, step, h0_ref[...])


def lstm_forward(w_h, h0, c0, px, *, precision=None, interpret=False, num_warps=4):
    T, B, G = px.shape
    H = G // 4
    spec_bh = pl.BlockSpec((ROWS, H), lambda b: (b, 0))
    spec_t = lambda width: pl.BlockSpec((T, ROWS, width), lambda b: (0, b, 0))
    kernel = functools.partial(_lstm_kernel, steps=T, hidden=H, precision=precision)
    f32 = jnp.float32
    extra = {} if interpret else dict(
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1))
    return pl.pallas_call(
        kernel, grid=(B // ROWS,),
        in_specs=[pl.BlockSpec((H, G), lambda b: (0, 0)), spec_bh, spec_bh, spec_t(G)],
        out_specs=[spec_t(H), spec_t(H), spec_t(G)],
        out_shape=[jax.ShapeDtypeStruct((T, B, H), f32), jax.ShapeDtypeStruct((T, B, H), f32),
                   jax.ShapeDtypeStruct((T, B, G), f32)],
        interpret=interpret, **extra)(w_h, h0, c0, px)


def rnn_forward(w_h, h0, px, *, precision=None, interpret=False, num_warps=4, hoist=False):
    T, B, H = px.shape
    kernel = functools.partial(_rnn_kernel, steps=T, hidden=H, precision=precision, hoist=hoist)
    extra = {} if interpret else dict(
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1))
    return pl.pallas_call(
        kernel, grid=(B // ROWS,),
        in_specs=[pl.BlockSpec((H, H), lambda b: (0, 0)), pl.BlockSpec((ROWS, H), lambda b: (b, 0)),
                  pl.BlockSpec((T, ROWS, H), lambda b: (0, b, 0))],
        out_specs=pl.BlockSpec((T, ROWS, H), lambda b: (0, b, 0)),
        out_shape=jax.ShapeDtypeStruct((T, B, H), jnp.float32),
        interpret=interpret, **extra)(w_h, h0, px)


def lstm_reference(w_h, h0, c0, px, precision=None):
    def body(carry, px_t):
        h, c = carry
        z = px_t + jnp.dot(h, w_h, precision=precision)
        i, f, g, o = jnp.split(z, 4, axis=-1)
        i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), (h, c, jnp.concatenate([i, f, g, o], -1))
    return jax.lax.scan(body, (h0, c0), px, unroll=8)[1]


def rnn_reference(w_h, h0, px, precision=None):
    def body(h, px_t):
        h = jnp.tanh(px_t + jnp.dot(h, w_h, precision=precision))
        return h, h
    return jax.lax.scan(body, h0, px, unroll=8)[1]


def inputs(T, B, H, gates, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    w = jax.random.normal(k[0], (H, gates * H)) / jnp.sqrt(H)
    return (w, 0.1 * jax.random.normal(k[1], (B, H)), 0.1 * jax.random.normal(k[2], (B, H)),
            jax.random.normal(k[3], (T, B, gates * H)))


def _tdot(a, w, precision):
    """a @ wᵀ."""
    return jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _lstm_bwd_kernel(w_ref, c0_ref, cs_ref, g_ref, ghs_ref, gh_ref, gc_ref, gz_ref, dh0_ref, dc0_ref, *, steps,
                     hidden, precision):
    H = hidden

    def step(s, carry):
        dh, dc = carry
        t = steps - 1 - s
        c = cs_ref[t, :, :]
        c_prev = jnp.where(t > 0, cs_ref[jnp.maximum(t - 1, 0), :, :], c0_ref[...])
        i, f, g, o = (g_ref[t, :, pl.ds(k * H, H)] for k in range(4))
        dh = dh + ghs_ref[t, :, :]
        tanh_c = jnp.tanh(c)
        dc = dc + dh * o * (1 - tanh_c * tanh_c)
        dz = (dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g), dh * tanh_c * o * (1 - o))
        dh_new = None
        for k, v in enumerate(dz):
            gz_ref[t, :, pl.ds(k * H, H)] = v
            term = _tdot(v, w_ref[:, pl.ds(k * H, H)], precision)
            dh_new = term if dh_new is None else dh_new + term
        return dh_new, dc * f

    dh, dc = jax.lax.fori_loop(0, steps, step, (gh_ref[...], gc_ref[...]))
    dh0_ref[...] = dh
    dc0_ref[...] = dc


def lstm_backward(w_h, c0, cs, gates, g_hs, g_h, g_c, *, precision=None, interpret=False, num_warps=4):
    T, B, G = gates.shape
    H = G // 4
    spec_bh = pl.BlockSpec((ROWS, H), lambda b: (b, 0))
    spec_t = lambda width: pl.BlockSpec((T, ROWS, width), lambda b: (0, b, 0))
    kernel = functools.partial(_lstm_bwd_kernel, steps=T, hidden=H, precision=precision)
    extra = {} if interpret else dict(
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1))
    f32 = jnp.float32
    return pl.pallas_call(
        kernel, grid=(B // ROWS,),
        in_specs=[pl.BlockSpec((H, G), lambda b: (0, 0)), spec_bh, spec_t(H), spec_t(G), spec_t(H), spec_bh,
                  spec_bh],
        out_specs=[spec_t(G), spec_bh, spec_bh],
        out_shape=[jax.ShapeDtypeStruct((T, B, G), f32), jax.ShapeDtypeStruct((B, H), f32),
                   jax.ShapeDtypeStruct((B, H), f32)],
        interpret=interpret, **extra)(w_h, c0, cs, gates, g_hs, g_h, g_c)


def _rnn_bwd_kernel(w_ref, hs_ref, ghs_ref, gh_ref, gz_ref, dh0_ref, *, steps, precision, hoist=False):
    w_held = w_ref[...] if hoist else None

    def step(s, dh):
        t = steps - 1 - s
        h = hs_ref[t, :, :]
        dz = (dh + ghs_ref[t, :, :]) * (1 - h * h)
        gz_ref[t, :, :] = dz
        return _tdot(dz, w_held if hoist else w_ref[...], precision)

    dh0_ref[...] = jax.lax.fori_loop(0, steps, step, gh_ref[...])


def rnn_backward(w_h, hs, g_hs, g_h, *, precision=None, interpret=False, num_warps=4, hoist=False):
    T, B, H = hs.shape
    spec_bh = pl.BlockSpec((ROWS, H), lambda b: (b, 0))
    spec_t = pl.BlockSpec((T, ROWS, H), lambda b: (0, b, 0))
    kernel = functools.partial(_rnn_bwd_kernel, steps=T, precision=precision, hoist=hoist)
    extra = {} if interpret else dict(
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1))
    f32 = jnp.float32
    return pl.pallas_call(
        kernel, grid=(B // ROWS,),
        in_specs=[pl.BlockSpec((H, H), lambda b: (0, 0)), spec_t, spec_t, spec_bh],
        out_specs=[spec_t, spec_bh],
        out_shape=[jax.ShapeDtypeStruct((T, B, H), f32), jax.ShapeDtypeStruct((B, H), f32)],
        interpret=interpret, **extra)(w_h, hs, g_hs, g_h)


def _previous(seq, first):
    return jnp.concatenate([first[None], seq[:-1]], axis=0)


def make_lstm(precision=None, interpret=False, num_warps=4):
    """hs = LSTM(params, xs) with h0 = c0 = 0, params: w_x [I,4H], w_h [H,4H], b [4H]; Pallas forward and backward."""
    @jax.custom_vjp
    def run(params, xs):
        return fwd(params, xs)[0]

    def fwd(params, xs):
        T, B, _ = xs.shape
        H = params["w_h"].shape[0]
        h0 = jnp.zeros((B, H), jnp.float32)
        px = jnp.einsum("tbi,ig->tbg", xs, params["w_x"], precision=precision) + params["b"]
        hs, cs, gates = lstm_forward(params["w_h"], h0, h0, px, precision=precision, interpret=interpret,
                                     num_warps=num_warps)
        return hs, (params, xs, hs, cs, gates)

    def bwd(res, g_hs):
        params, xs, hs, cs, gates = res
        B, H = hs.shape[1:]
        zero = jnp.zeros((B, H), jnp.float32)
        gz, _, _ = lstm_backward(params["w_h"], zero, cs, gates, g_hs, zero, zero, precision=precision,
                                 interpret=interpret, num_warps=num_warps)
        h_prev = _previous(hs, zero)
        grads = {"w_h": jnp.einsum("tbh,tbg->hg", h_prev, gz, precision=precision),
                 "w_x": jnp.einsum("tbi,tbg->ig", xs, gz, precision=precision), "b": gz.sum((0, 1))}
        return grads, jnp.einsum("tbg,ig->tbi", gz, params["w_x"], precision=precision)

    run.defvjp(fwd, bwd)
    return run


def make_rnn(precision=None, interpret=False, num_warps=4, hoist=False):
    @jax.custom_vjp
    def run(params, xs):
        return fwd(params, xs)[0]

    def fwd(params, xs):
        T, B, _ = xs.shape
        H = params["w_h"].shape[0]
        h0 = jnp.zeros((B, H), jnp.float32)
        px = jnp.einsum("tbi,ig->tbg", xs, params["w_x"], precision=precision) + params["b"]
        hs = rnn_forward(params["w_h"], h0, px, precision=precision, interpret=interpret, num_warps=num_warps,
                         hoist=hoist)
        return hs, (params, xs, hs)

    def bwd(res, g_hs):
        params, xs, hs = res
        B, H = hs.shape[1:]
        zero = jnp.zeros((B, H), jnp.float32)
        gz, _ = rnn_backward(params["w_h"], hs, g_hs, zero, precision=precision, interpret=interpret,
                             num_warps=num_warps, hoist=hoist)
        grads = {"w_h": jnp.einsum("tbh,tbg->hg", _previous(hs, zero), gz, precision=precision),
                 "w_x": jnp.einsum("tbi,tbg->ig", xs, gz, precision=precision), "b": gz.sum((0, 1))}
        return grads, jnp.einsum("tbg,ig->tbi", gz, params["w_x"], precision=precision)

    run.defvjp(fwd, bwd)
    return run


def plain(kind, precision=None):
    """The same model by lax.scan + autodiff (reference)."""
    def run(params, xs):
        B, H = xs.shape[1], params["w_h"].shape[0]
        px = jnp.einsum("tbi,ig->tbg", xs, params["w_x"], precision=precision) + params["b"]
        h0 = jnp.zeros((B, H), jnp.float32)
        if kind == "lstm":
            return lstm_reference(params["w_h"], h0, h0, px, precision)[0]
        return rnn_reference(params["w_h"], h0, px, precision)
    return run


def params_for(kind, I, H, seed=0):
    G = 4 * H if kind == "lstm" else H
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"w_x": jax.random.normal(k[0], (I, G)) / jnp.sqrt(I), "w_h": jax.random.normal(k[1], (H, G)) / jnp.sqrt(H),
            "b": 0.1 * jax.random.normal(k[2], (G,))}
