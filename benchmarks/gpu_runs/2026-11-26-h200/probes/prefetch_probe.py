"""RNN fwd+bwd through rnnlab.scan on a GPU: Pallas with the input read ahead, without, XLA loops, torch cuDNN."""
import os, sys
sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "benchmarks"), os.path.dirname(__file__)]
import jax
import bench_cells as bc
from gpu_probe import medians
from rnnlab.native import pallas


def with_prefetch(call, flag):
    def run():
        saved = pallas.PREFETCH
        pallas.PREFETCH = flag
        try:
            return call()
        finally:
            pallas.PREFETCH = saved
    return run


for shape in ((16, 1000, 32, 128), (32, 100, 64, 128)):
    calls = {"pallas ahead": with_prefetch(bc.rnnlab_call("RNN", shape), True),
             "pallas not ahead": with_prefetch(bc.rnnlab_call("RNN", shape), False),
             "xla loops": bc.rnnlab_call("RNN", shape, {"RNNLAB_PALLAS": "0"}),
             "torch cuDNN": bc.torch_call("RNN", shape)}
    med, first = medians(calls, rounds=9)
    print(f"RNN {shape}: " + " | ".join(f"{n} {m * 1e3:.3f} ms (1st {first[n]:.2f} s)" for n, m in med.items()))
    print("  torch/x: " + ", ".join(f"{n} {med['torch cuDNN'] / m:.2f}" for n, m in med.items()), flush=True)
