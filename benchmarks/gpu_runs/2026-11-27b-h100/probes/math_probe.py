"""Where a Pallas kernel's step goes on a GPU: the kernels as landed against variants compiled in the same process.

  exp-tanh: tanh as 1 - 2 / (1 + exp(2x)) (libdevice's expf and a division, no libdevice tanhf)
  approx:   tanh.approx.f32 (Pallas's `approx_tanh`, about 2^-11 relative) for tanh, and sigmoid as
            0.5 + 0.5 tanh(x / 2) through it: an upper bound on what cheaper transcendentals could bring
  w-t:      the RNN's backward kernel with W_h transposed once, before the loop (as landed the loop's dot contracts
            W_h's output axis)
`--check` (no GPU): exp-tanh and w-t in Pallas's interpreter against the kernels as landed.
"""
import functools
import sys
import types

sys.path.insert(0, "benchmarks")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import rnnlab.cells  # noqa: E402
from rnnlab.native import pallas  # noqa: E402


def exp_tanh(x):
    return 1.0 - 2.0 / (1.0 + jnp.exp(2.0 * x))


def approx_tanh(x):
    from jax.experimental.pallas import triton as plgpu
    return plgpu.approx_tanh(x)


def approx_sigmoid(x):
    return 0.5 + 0.5 * approx_tanh(0.5 * x)


class Proxy(types.ModuleType):
    def __init__(self, module, **overrides):
        super().__init__(module.__name__)
        self._module, self._overrides = module, overrides

    def __getattr__(self, name):
        return self._overrides[name] if name in self._overrides else getattr(self._module, name)


def rnn_backward_w_t(w_ref, hs_ref, g_hs_ref, g_h_ref, *refs, steps, reverse, activation, ahead):
    from rnnlab.fused import _RNN_DERIVATIVES

    *valid_ref, g_z_ref, g_h0_ref = refs
    derivative = _RNN_DERIVATIVES[activation]
    w_t = w_ref[...].T  # once, before the loop
    back = not reverse

    def read(s):
        t = pallas._read_time(s, steps, back)
        return (hs_ref[t, :, :], g_hs_ref[t, :, :], *pallas._mask_at(valid_ref, t))

    def advance(s, g_carry, h_t, g_h_t, *valid_t):
        keep = pallas._keep(valid_t)
        g = g_h_t + g_carry
        g_z = pallas._kept(keep, g if derivative is None else g * derivative(h_t), 0.0)
        g_z_ref[pallas._time(s, steps, back), :, :] = g_z
        return pallas._kept(keep, jnp.dot(g_z, w_t, preferred_element_type=jnp.float32), g)

    g_h0_ref[...] = pallas._loop(steps, read, advance, g_h_ref[...], ahead)


class Variant:
    """Patches pallas.py's names while a call is traced and lowered."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.saved = (pallas.jnp, pallas.jax, dict(rnnlab.cells._ACTIVATIONS), pallas._rnn_backward_kernel)
        if self.name in ("exp-tanh", "approx"):
            tanh = exp_tanh if self.name == "exp-tanh" else approx_tanh
            sigmoid = jax.nn.sigmoid if self.name == "exp-tanh" else approx_sigmoid
            pallas.jnp = Proxy(jnp, tanh=tanh)
            pallas.jax = Proxy(jax, nn=Proxy(jax.nn, sigmoid=sigmoid))
            rnnlab.cells._ACTIVATIONS["tanh"] = tanh
        if self.name == "w-t":
            pallas._rnn_backward_kernel = rnn_backward_w_t

    def __exit__(self, *exc):
        pallas.jnp, pallas.jax, activations, pallas._rnn_backward_kernel = self.saved
        rnnlab.cells._ACTIVATIONS.clear()
        rnnlab.cells._ACTIVATIONS.update(activations)


def check():
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 20))
    normal = lambda *s: jax.random.normal(next(keys), s)  # noqa: E731
    T, B, H = 7, 20, 32
    for gates, name in ((1, "rnn"), (4, "lstm"), (3, "gru")):
        w = normal(H, gates * H) / np.sqrt(H)
        h0, c0, px = normal(B, H), normal(B, H), normal(T, B, gates * H)
        for variant in ("exp-tanh", "w-t"):
            def run():
                if name == "rnn":
                    hs, = pallas.rnn_forward(w, h0, px, reverse=False, activation="tanh", interpret=True)
                    back = pallas.rnn_backward(w, hs, h0, normal(T, B, H) * 0 + 1, h0 * 0 + 1, reverse=False,
                                               activation="tanh", interpret=True)
                    return [hs, *back]
                if name == "lstm":
                    return pallas.lstm_forward(w, h0, c0, px, reverse=False, interpret=True)
                return pallas.gru_forward(w, normal(gates * H) * 0 + 0.1, h0, px, reverse=False, interpret=True)
            want = run()
            with Variant(variant):
                got = run()
            err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want))
            print(name, variant, "max abs difference", err)
            assert err < 1e-5, err


def main():
    from bench_cells import _ms, blocked_medians, rnnlab_call, torch_call

    print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
    cases = (("RNN", (16, 1000, 32, 128)), ("RNN", (16, 1000, 32, 64)), ("LSTM", (16, 1000, 32, 64)),
             ("GRU", (16, 1000, 32, 64)), ("RNN", (32, 100, 64, 128)), ("LSTM", (32, 100, 64, 64)))
    for kind, shape in cases:
        calls = {}
        for variant in ("landed", "exp-tanh", "approx", "w-t"):
            if variant == "w-t" and kind != "RNN":
                continue
            call = rnnlab_call(kind, shape)
            try:
                with Variant(variant):
                    got = call()  # traced, lowered and compiled now
                calls[variant] = call
                if variant != "landed":
                    ref = calls["landed"]()
                    diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
                    print(kind, shape, variant, "gradient relative difference to landed", f"{diff:.2e}", flush=True)
            except Exception as error:  # noqa: BLE001
                print(kind, shape, variant, "failed:", type(error).__name__, str(error)[:400], flush=True)
        calls["torch"] = torch_call(kind, shape)
        medians, fastest, _ = blocked_medians(calls)
        base = medians["landed"]
        print(kind, shape, " | ".join(f"{n} {_ms(medians[n])} ({base / medians[n]:.2f}x)" for n in calls), flush=True)


if __name__ == "__main__":
    check() if "--check" in sys.argv else main()
