#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the GPU checks, then the benchmarks (and the Pallas kernels' probe), each under a time limit, each one's output in
# a file of OUT_DIR. Runs with the machine's own python3 and its jax (CUDA), torch, flax and optax; nothing is
# installed. The cuDNN comparisons of tests/test_gpu.py and the tests of scan, the fused rules and gradient flow run
# with float32 matmuls in full precision (JAX's default on a GPU allows TF32, which the float64 truths of those tests
# would not accept), and compiled at full optimisation as users' programs are (`make test` compiles less); the
# benchmarks run at each library's default precision.
#
#     bash benchmarks/gpu.sh [OUT_DIR]        # default: ./gpu_results; PYTHON=... for another interpreter
set -u
python=${PYTHON:-python3}
out=${1:-gpu_results}
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

timeout "${GPU_BENCH_CELLS_S:-220}" "$python" benchmarks/run.py cells > "$out/bench_cells.txt" 2>&1
echo "exit $?" >> "$out/bench_cells.txt"

JAX_DEFAULT_MATMUL_PRECISION=highest JAX_DISABLE_MOST_OPTIMIZATIONS=0 \
  timeout "${GPU_TESTS_S:-140}" "$python" -m pytest -q -p no:cacheprovider -n 8 \
  tests/test_gpu.py tests/test_fused.py tests/test_scan.py tests/test_gradflow.py \
  tests/test_native.py::test_on_a_gpu_the_loops_lower_unrolled \
  tests/test_native.py::test_on_a_gpu_the_recurrences_run_as_pallas_kernels \
  tests/test_native.py::test_pallas_kernels_equal_the_float64_references > "$out/tests.txt" 2>&1
echo "exit $?" >> "$out/tests.txt"

timeout "${GPU_PROBE_KERNELS_S:-120}" "$python" benchmarks/probe_gpu_kernels.py > "$out/probe_gpu_kernels.txt" 2>&1
echo "exit $?" >> "$out/probe_gpu_kernels.txt"

timeout "${GPU_PROBE_S:-50}" "$python" benchmarks/probe_precision.py > "$out/probe_precision.txt" 2>&1
echo "exit $?" >> "$out/probe_precision.txt"

timeout "${GPU_BENCH_REST_S:-170}" "$python" benchmarks/run.py gradflow long > "$out/bench_sweep_long.txt" 2>&1
echo "exit $?" >> "$out/bench_sweep_long.txt"
