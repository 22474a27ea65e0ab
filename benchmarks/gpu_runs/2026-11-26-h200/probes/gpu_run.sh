#!/usr/bin/env bash
# One device call: pallas probe, XLA flag variants, gradient-flow sweep bench (flow-unroll row).
set -u
out=${OUT:-/tmp/out}; mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/machine.txt" 2>&1
git log -1 --format=%h >> "$out/machine.txt"
timeout ${P1:-150} python3 .probe/gpu_probe.py pallas > "$out/pallas.txt" 2>&1; echo "exit $?" >> "$out/pallas.txt"
tail -c 3000 "$out/pallas.txt"
{
  for v in default while while_unroll1; do
    case $v in
      default) flags=""; u=8;;
      while) flags="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"; u=8;;
      while_unroll1) flags="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"; u=1;;
    esac
    echo "=== $v"
    XLA_FLAGS="$flags" RNNLAB_GPU_UNROLL=$u timeout ${P2:-60} python3 .probe/gpu_probe.py cells 2>&1 | grep -v '^WARNING\|^I0000\|^W0000' | tail -12
    echo "exit $?"
  done
} > "$out/flags.txt" 2>&1
tail -c 2500 "$out/flags.txt"
timeout ${P3:-120} python3 benchmarks/bench_gradflow_sweep.py > "$out/gradflow.txt" 2>&1; echo "exit $?" >> "$out/gradflow.txt"
tail -c 3000 "$out/gradflow.txt"
