"""Shared test setup: the cells every test is parametrised over, and JAX's persistent compilation cache.

A test that takes an argument named ``cell`` runs once per entry of `LIBRARY_CELLS`, plus once per entry of its
module's ``EXTRA_CELLS`` (how `test_scan` adds a cell defined outside the library), unless it parametrises ``cell``
itself.
"""

import os
import pathlib
import subprocess
import sys

# Most of the suite's time is XLA compiling many small programs. `make test` compiles them as JAX's own switch
# `jax_disable_most_optimizations` does (LLVM at -O0, no expensive passes): about 30 % less time on 2 cores, with
# the same HLO programs and the same C++ kernels. The machine code differs, so float32 results may differ in the
# last bits (rounding, not semantics); `make test-all` runs every test at full optimisation, as users compile.
# Set here, before JAX is imported, so that the processes the tests start inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# In that mode XLA's CPU backend still spends most of its compile time in its newer fusion emitters (an MLIR
# pipeline); their older LLVM emitters compile the same fused HLO about 3x faster there (the suite: 524 s -> 280 s
# on 2 cores, `pytest --durations`). Again only the machine code differs. Processes the tests start inherit it; those
# that set XLA_FLAGS themselves append to it.
_QUICK_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flags: str) -> bool:
    """Whether this jaxlib's XLA takes ``flags``: a flag it does not know aborts the process (jax is not pinned, and
    XLA drops flags). Asked once, by the first pytest process; the workers it starts inherit the answer."""
    try:
        probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, timeout=300,
                               env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"})
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


import jax  # noqa: E402  (XLA reads XLA_FLAGS when its backend starts, not when JAX is imported)

if jax.config.read("jax_disable_most_optimizations") and _QUICK_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    _flags = f"{os.environ.get('XLA_FLAGS', '')} {_QUICK_COMPILE_FLAG}".strip()
    if _xla_accepts(_flags):
        os.environ["XLA_FLAGS"] = _flags

import pytest  # noqa: E402

import rnnlab  # noqa: E402

# Compiled programs are reused across test runs, even the small ones (most of the tests' time is compilation);
# `make clean-cache` clears the folder.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).parents[1] / ".jax_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

# hidden_size 5 against input size 3 in the tests, so a transposed weight fails loudly.
LIBRARY_CELLS = {
    "rnn_tanh": rnnlab.RNN(hidden_size=5, activation="tanh"),
    "rnn_relu": rnnlab.RNN(hidden_size=5, activation="relu"),
    "rnn_linear": rnnlab.RNN(hidden_size=5, activation="linear"),
    "lstm": rnnlab.LSTM(hidden_size=5),
    "gru": rnnlab.GRU(hidden_size=5),
}


def pytest_generate_tests(metafunc):
    explicit = set()
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        explicit.update(n.strip() for n in (names.split(",") if isinstance(names, str) else names))
    if "cell" in metafunc.fixturenames and "cell" not in explicit:
        cells = {**LIBRARY_CELLS, **getattr(metafunc.module, "EXTRA_CELLS", {})}
        metafunc.parametrize("cell", list(cells.values()), ids=list(cells))


@pytest.fixture
def two_processes_cache(tmp_path):
    """``run(script) -> [names after the first process, after the second]``: ``script`` (Python source) run in two
    fresh processes, one after the other, sharing a new persistent compilation cache that stores every program; the
    cache's file names (one per program) after each."""
    cache = tmp_path / "cache"
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PLATFORMS": "cpu"}

    def run(script: str) -> list[list[str]]:
        entries = []
        for _ in range(2):
            completed = subprocess.run([sys.executable, "-c", script], env=env, cwd=pathlib.Path(__file__).parents[1],
                                       capture_output=True, text=True, timeout=240)
            assert completed.returncode == 0, completed.stderr[-3000:]
            entries.append(sorted(path.name for path in cache.iterdir()))
        return entries

    return run


#: The modules with the suite's longest tests (`pytest --durations`: other processes, several devices, experiment
#: scripts), run first: under `pytest -n 2` the two workers then finish on short tests together, rather than one of
#: them on a long test while the other waits.
_LONG_FIRST = ("test_multihost.py", "test_train_sharding.py", "test_experiments_training.py", "test_sweep.py",
               "test_sharded_scan.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in _LONG_FIRST)  # stable: the order within each group stays
