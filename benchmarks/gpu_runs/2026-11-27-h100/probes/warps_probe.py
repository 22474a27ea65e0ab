"""Warps and stages of the Pallas kernels on a GPU: each rnnlab call compiled under one setting, timed together."""
import functools
import sys

sys.path.insert(0, "benchmarks")
import jax  # noqa: E402
from bench_cells import _ms, blocked_medians, rnnlab_call, torch_call  # noqa: E402

from rnnlab.native import pallas  # noqa: E402

SETTINGS = ((8, 1), (4, 1), (16, 1), (8, 2), (4, 2))
CASES = (("LSTM", (16, 1000, 32, 64)), ("GRU", (16, 1000, 32, 64)), ("RNN", (16, 1000, 32, 128)),
         ("RNN", (16, 1000, 32, 64)), ("LSTM", (32, 100, 64, 64)))
original = pallas._compiler_params
print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
for kind, shape in CASES:
    calls = {}
    for warps, stages in SETTINGS:
        from jax.experimental.pallas import triton as pallas_triton
        params = getattr(pallas_triton, "CompilerParams", None) or pallas_triton.TritonCompilerParams
        pallas._compiler_params = functools.cache(lambda w=warps, s=stages: params(num_warps=w, num_stages=s))
        call = rnnlab_call(kind, shape)
        try:
            call()  # compiled now, under this setting
            calls[f"w{warps}s{stages}"] = call
        except Exception as error:  # noqa: BLE001
            print(kind, shape, warps, stages, "failed:", type(error).__name__, str(error)[:300], flush=True)
    pallas._compiler_params = original
    calls["torch"] = torch_call(kind, shape)
    medians, fastest, _ = blocked_medians(calls)
    base = medians["w8s1"]
    print(kind, shape, " | ".join(f"{name} {_ms(medians[name])} ({base / medians[name]:.2f}x)" for name in calls),
          flush=True)
