# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# JAX's persistent compilation cache, in a folder the user can see and clear (`make clean-cache`).
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache

.PHONY: demo test test-all test-floors bench clean-cache

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# The native LSTM kernels (C++, XLA FFI): built now rather than on first use; without a compiler rnnlab warns
	# and runs the LSTM on XLA alone.
	$(PY) -c "import rnnlab.native as n; print('rnnlab native kernels:', n.available())"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) experiments/gradient_flow.py

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --timeout 600 tests

# Every test, compiled at full optimisation as users' programs are (`make test` compiles less: tests/conftest.py).
test-all: $(STAMP)
	JAX_DISABLE_MOST_OPTIMIZATIONS=0 $(PY) -m pytest -q -n 2 --timeout 1800 -m '' tests

# The suite on the oldest releases pyproject.toml allows: jax, jaxlib, flax, optax and numpy each pinned to its
# floor (`jax>=0.10.0` -> `jax==0.10.0`), in a venv of its own (with $(PYTHON): one that has wheels of them, 3.11).
FLOORS_VENV := .venv-floors
FLOORS := $(shell sed -n 's/^ *"\(jax\|jaxlib\|flax\|optax\|numpy\)>=\([0-9.]*\)",.*/\1==\2/p' pyproject.toml)
test-floors:
	test -d $(FLOORS_VENV) || $(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install --quiet -e '.[dev]' $(foreach f,$(FLOORS),'$(f)')
	$(FLOORS_VENV)/bin/python -m pip list 2>/dev/null | grep -E '^(jax|jaxlib|flax|optax|numpy) '
	$(FLOORS_VENV)/bin/python -m pytest -q -n 2 --timeout 600 tests

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean-cache:
	rm -rf $(JAX_COMPILATION_CACHE_DIR)
