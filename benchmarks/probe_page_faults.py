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
#: (batch, T, input, hidden), as `bench_cells.py`'s.
SHAPES = ((16, 1000, 32, 128), (64, 200, 128, 256), (128, 50, 256, 512))


def child() -> None:
    """Each shape's line for this process's setting: the LSTM's gradient as `bench_cells.py` calls it, rnnlab's and
    torch's."""
    import resource
    import time

    from bench_cells import rnnlab_call, torch_call

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

    for shape in SHAPES:
        print(f"{os.environ.get('GLIBC_TUNABLES', '') or 'default'}\t{','.join(map(str, shape))}\t"
              f"rnnlab {fastest(rnnlab_call('LSTM', shape))}\ttorch {fastest(torch_call('LSTM', shape))}", flush=True)


def main() -> None:
    for name, tunables in SETTINGS.items():
        env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        subprocess.run([sys.executable, __file__, "--child"], env=env, check=True)


if __name__ == "__main__":
    child() if "--child" in sys.argv[1:] else main()
