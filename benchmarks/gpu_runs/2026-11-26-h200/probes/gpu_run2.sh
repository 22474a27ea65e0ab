#!/usr/bin/env bash
set -u
out=${OUT:-/tmp/out}; mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/machine.txt" 2>&1
JAX_DEFAULT_MATMUL_PRECISION=highest JAX_DISABLE_MOST_OPTIMIZATIONS=0 timeout 130 python3 -m pytest -q -p no:cacheprovider -n 8 \
  tests/test_gpu.py tests/test_native.py -k "gpu or pallas" > "$out/tests.txt" 2>&1; echo "exit $?" >> "$out/tests.txt"
tail -5 "$out/tests.txt"
timeout 70 python3 .probe/prefetch_probe.py > "$out/prefetch.txt" 2>&1; echo "exit $?" >> "$out/prefetch.txt"
grep -v '^WARNING\|^W0000\|^I0000' "$out/prefetch.txt" | tail -6
timeout 45 python3 .probe/coop_lstm.py > "$out/coop.txt" 2>&1; echo "exit $?" >> "$out/coop.txt"
grep -v '^WARNING\|^W0000\|^I0000' "$out/coop.txt" | tail -8
timeout 100 python3 benchmarks/bench_gradflow_sweep.py > "$out/gradflow.txt" 2>&1; echo "exit $?" >> "$out/gradflow.txt"
grep '^|\|exit' "$out/gradflow.txt"
