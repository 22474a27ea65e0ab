"""rnnlab: a JAX lab for recurrent networks.

A cell is configuration plus pure functions (`rnnlab.cells`); `rnnlab.scan` runs any cell over time
(`rnnlab.split_batch` splits its kernels' batch over devices in traced code); `rnnlab.init`
holds the initialisers; `rnnlab.interop` converts to and from flax and torch. The gradient-flow lab is
`rnnlab.gradflow` (log-domain measurements), `rnnlab.theory` (closed forms) and `rnnlab.sweep` (vmapped, sharded
sweeps); training is `rnnlab.train` with `rnnlab.models`, `rnnlab.tasks` and `rnnlab.checkpoint`; result files are
`rnnlab.results`, figures `rnnlab.plots` (imported on demand: it loads matplotlib).
"""

import importlib

from rnnlab import init
from rnnlab.cells import GRU, LSTM, RNN, Stack
from rnnlab.native import split_batch
from rnnlab.scan import remat_near_sqrt, scan

_SUBMODULES = ("checkpoint", "gradflow", "interop", "models", "results", "sweep", "tasks", "theory", "train")


def __getattr__(name: str):
    # The other submodules load on first use, so that a sweep does not import optax (training) and the tasks: a
    # fresh process's `import rnnlab` is part of every experiment's run time.
    if name in _SUBMODULES:
        return importlib.import_module(f"rnnlab.{name}")
    raise AttributeError(f"module 'rnnlab' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBMODULES])


__all__ = [
    "GRU", "LSTM", "RNN", "Stack", "checkpoint", "gradflow", "init", "interop", "models", "remat_near_sqrt",
    "results", "scan", "split_batch", "sweep", "tasks", "theory", "train",
]
__version__ = "0.1.0"
