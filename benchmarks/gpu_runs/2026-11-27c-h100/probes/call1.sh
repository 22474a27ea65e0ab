#!/usr/bin/env bash
# GPU call 1 (2026-11-27 session 2): team kernels' correctness probe, run.py cells, the GPU tests, team timings.
out=$1
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAX_COMPILATION_CACHE_DIR=/tmp/jc
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $out/machine.txt 2>&1
timeout 110 python3 -W ignore::DeprecationWarning .gpuprobe/team_probe.py --check > $out/probe_check.txt 2>&1
echo "exit $?" >> $out/probe_check.txt
GPU_BENCH_CELLS_S=190 GPU_TESTS_S=220 bash benchmarks/gpu.sh $out/g cells tests
timeout 60 python3 -W ignore::DeprecationWarning .gpuprobe/team_probe.py --time > $out/probe_time.txt 2>&1
echo "exit $?" >> $out/probe_time.txt
