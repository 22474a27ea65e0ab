"""rnnlab: a JAX lab for recurrent networks.

A cell is configuration plus pure functions (`rnnlab.cells`); `rnnlab.scan` runs any cell over time; `rnnlab.init`
holds the initialisers; `rnnlab.interop` converts to and from flax and torch.
"""

from rnnlab import init, interop
from rnnlab.cells import GRU, LSTM, RNN, Stack
from rnnlab.scan import scan

__all__ = ["GRU", "LSTM", "RNN", "Stack", "init", "interop", "scan"]
__version__ = "0.1.0"
