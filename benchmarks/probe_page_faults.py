"""Probe: page faults per training-style call, and what glibc's allocator settings do to them, for rnnlab's LSTM
gradient and torch's, each setting in a fresh process (``GLIBC_TUNABLES`` is read when a process starts). Not run
by `make bench`: it measures the process's environment, not rnnlab. Recorded in `benchmarks/README.md`
("Page faults").

    python benchmarks/probe_page_faults.py

Each figure: the fastest of 15 calls after one warm-up call, and the minor page faults per call (`getrusage`).
"""

from __future__ import annotations

import os
import subprocess
import sys

SETTINGS = {"default": "", "hugetlb": "glibc.malloc.hugetlb=1",
            "no mmap": "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295"}
#: (batch, input, hidden, T)
SHAPES = ((16, 32, 128, 1000), (64, 128, 256, 200), (128, 256, 512, 50))


def child() -> None:
    import resource
    import time

    import jax
    import jax.numpy as jnp
    import torch

    import rnnlab

    torch.set_num_threads(2)

    def fastest(call) -> str:
        call()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = []
        for _ in range(15):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        per_call = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // 15
        return f"{1e3 * min(times):.1f} ms, {per_call} faults"

    for batch, inputs, hidden, steps in SHAPES:
        cell = rnnlab.LSTM(hidden_size=hidden)
        params = cell.init(jax.random.PRNGKey(0), inputs)
        xs = jax.random.normal(jax.random.PRNGKey(1), (steps, batch, inputs))
        grad = jax.jit(jax.grad(lambda p, x: jnp.mean(rnnlab.scan(cell, p, x)[0] ** 2)))
        module, xt = torch.nn.LSTM(inputs, hidden), torch.randn(steps, batch, inputs)

        def torch_grad():
            module.zero_grad()
            ys, _ = module(xt)
            ys.square().mean().backward()

        print(f"{os.environ.get('GLIBC_TUNABLES', '') or 'default'}\t{batch},{steps},{inputs},{hidden}\t"
              f"rnnlab {fastest(lambda: jax.block_until_ready(grad(params, xs)))}\ttorch {fastest(torch_grad)}",
              flush=True)


def main() -> None:
    for name, tunables in SETTINGS.items():
        env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        subprocess.run([sys.executable, __file__, "--child"], env=env, check=True)


if __name__ == "__main__":
    child() if "--child" in sys.argv[1:] else main()
