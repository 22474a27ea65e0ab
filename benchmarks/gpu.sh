#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the GPU checks, then the benchmarks and the Pallas kernels' probe, each under a
# time limit, each one's output in a file of OUT_DIR. Runs with the machine's own python3 and its jax (CUDA), torch,
# flax and optax; nothing is installed. The cuDNN comparisons of tests/test_gpu.py and the tests of scan, the fused
# rules and gradient flow run with float32 matmuls in full precision (JAX's default on a GPU allows TF32, which the
# float64 truths of those tests would not accept), and compiled at full optimisation as users' programs are
# (`make test` compiles less); the benchmarks run at each library's default precision.
#
#     bash benchmarks/gpu.sh [OUT_DIR] [PART...]   # default: ./gpu_results, every part; PYTHON=... for another python
#
# Parts, in this order, and their time limits (seconds; each can be set in the environment):
#     cells      run.py cells                                       GPU_BENCH_CELLS_S   200
#     forward    run.py forward (the forward pass alone)            GPU_BENCH_FORWARD_S  90
#     tests      the GPU test subset                                GPU_TESTS_S         300
#     sharding   the sharding tests on 4 CPU devices, this JAX      GPU_SHARDING_S      120
#     kernels    probe_gpu_kernels.py                               GPU_PROBE_KERNELS_S 120
#     team       probe_team_step.py                                 GPU_PROBE_TEAM_S     90
#     mosaic     probe_mosaic_rnn.py                                GPU_PROBE_MOSAIC_S  120
#     precision  probe_precision.py                                 GPU_PROBE_S          40
#     sweep      run.py gradflow long                               GPU_BENCH_REST_S    170
# Every part: about 21 minutes at most. With a cold compilation cache the tests part ran all 318 of its tests in
# 261 s at -n 16 on an H100 (2026-11-27, run 10; run 9 had reached 279 of 316 at 220 s); with the cache warm all
# of them took 74-84 s. Where GPU time is short, name the parts: `bash benchmarks/gpu.sh OUT tests kernels`. Run 10
# ran `cells tests team` (440 s), then `mosaic` (50 s) and `sharding sweep` (185 s) on one machine start.
set -u
python=${PYTHON:-python3}
out=${1:-gpu_results}
shift $(( $# > 0 ? 1 : 0 ))
parts=" ${*:-cells forward tests sharding kernels team mosaic precision sweep} "
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$python" -c "import jax, torch, flax, optax; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__,
torch.cuda.get_device_name(0), 'cudnn', torch.backends.cudnn.version(), '| flax', flax.__version__, '| optax',
optax.__version__)"
} > "$out/machine.txt" 2>&1

# part NAME FILE LIMIT COMMAND...: COMMAND under LIMIT seconds, its output and exit status in OUT_DIR/FILE, if NAME
# is among the parts asked for.
part() {
  local name=$1 file=$2 limit=$3
  shift 3
  [[ $parts == *" $name "* ]] || return 0
  timeout "$limit" "$@" > "$out/$file" 2>&1
  echo "exit $?" >> "$out/$file"
}

part cells bench_cells.txt "${GPU_BENCH_CELLS_S:-200}" "$python" benchmarks/run.py cells

part forward bench_forward.txt "${GPU_BENCH_FORWARD_S:-90}" "$python" benchmarks/run.py forward

JAX_DEFAULT_MATMUL_PRECISION=highest JAX_DISABLE_MOST_OPTIMIZATIONS=0 \
  part tests tests.txt "${GPU_TESTS_S:-300}" "$python" -m pytest -q -rfE -p no:cacheprovider -p no:benchmark -n 16 \
  tests/test_gpu.py tests/test_fused.py tests/test_scan.py tests/test_gradflow.py \
  tests/test_native.py::test_on_a_gpu_the_loops_lower_unrolled \
  tests/test_native.py::test_on_a_gpu_the_recurrences_run_as_pallas_kernels \
  tests/test_native.py::test_pallas_kernels_equal_the_float64_references

# The device's JAX is often newer than the one `make test` installs: explicit sharding mode and `split_batch` on it.
# Each file's tests share one child process of 4 CPU devices: one worker per file.
JAX_PLATFORMS=cpu part sharding sharding.txt "${GPU_SHARDING_S:-120}" "$python" -m pytest -q -rfE -p no:cacheprovider \
  -p no:benchmark -n 2 --dist loadfile tests/test_sharded_scan.py tests/test_train_sharding.py

part kernels probe_gpu_kernels.txt "${GPU_PROBE_KERNELS_S:-120}" "$python" benchmarks/probe_gpu_kernels.py

part team probe_team_step.txt "${GPU_PROBE_TEAM_S:-90}" "$python" benchmarks/probe_team_step.py

part mosaic probe_mosaic_rnn.txt "${GPU_PROBE_MOSAIC_S:-120}" "$python" benchmarks/probe_mosaic_rnn.py

part precision probe_precision.txt "${GPU_PROBE_S:-40}" "$python" benchmarks/probe_precision.py

part sweep bench_sweep_long.txt "${GPU_BENCH_REST_S:-170}" "$python" benchmarks/run.py gradflow long
