"""Probe (GPU): where a step of the Pallas kernels' teams goes (`rnnlab.native.pallas._Team`), to choose what to
attack next at the long thin shape (batch 16, T = 1000), where the GRU's teams are at 0.5x of cuDNN (run 9).

Each cell's training-style call (`bench_cells.rnnlab_call`) is compiled four ways, all timed in one process as
`bench_cells.py` times (`blocked_medians`), with a forward-only call beside the first:

- ``landed``: the kernels as they are;
- ``exchange last``: each forward step stores the LSTM's cell state and gates or the GRU's gates and ``a_n`` before
  its units of ``h`` (what the team waits for), as the kernels did until GPU run 10 timed the landed order (``h``
  first) 5 % faster (the backward kernels and the plain RNN's forward store nothing else: the same program there);
- ``one read``: every program reads the step's row once and goes on, without waiting for the team: the wrong
  numbers (sentinel NaNs), timed to show what waiting for the slowest program and for the stores to arrive costs;
- ``no read``: the row read is of step 0's, cached (not volatile), and nothing is waited for: the step without the
  exchange's trip through L2, i.e. the matmuls, gate maths, loads of the inputs and stores.

Not run by `make bench`; `benchmarks/gpu.sh` runs it (part ``team``). ``--lower``: on a machine without a GPU, lower
each variant for CUDA only (checks the patches apply; with jax 0.10, whose Pallas lowers Triton calls without a GPU).

    python benchmarks/probe_team_step.py
"""

from __future__ import annotations

import contextlib
import sys

import jax
import jax.numpy as jnp
from bench_cells import _ms, _table, blocked_medians, rnnlab_call

import rnnlab
from rnnlab.native import pallas

#: (cell, batch, T, input, hidden)
CASES = (("LSTM", 16, 1000, 32, 128), ("GRU", 16, 1000, 32, 128), ("RNN", 64, 200, 128, 256))


@contextlib.contextmanager
def patched(variant: str):
    """`pallas` changed for ``variant`` (while a call runs: it is traced and lowered at its first)."""
    team = pallas._Team
    landed_store, landed_exchange = team.store, team.exchange

    def exchange_last(self, ref, t, blocks, waiting, also=()):
        for other, other_blocks in also:
            landed_store(self, other, t, other_blocks)
        return landed_exchange(self, ref, t, blocks, waiting)

    def without_waiting(cached: bool):
        def exchange(self, ref, t, blocks, waiting, also=()):
            landed_store(self, ref, t, blocks)
            for other, other_blocks in also:
                landed_store(self, other, t, other_blocks)
            if self.size == 1:
                return blocks, waiting
            from jax.experimental.pallas import triton as pallas_triton

            row = 0 if cached else t
            return [pallas_triton.load(ref.at[row, :, self.whole(k)], volatile=not cached)
                    for k in range(len(blocks))], waiting
        return exchange

    try:
        if variant == "exchange last":
            team.exchange = exchange_last
        elif variant in ("one read", "no read"):
            team.exchange = without_waiting(cached=variant == "no read")
        yield
    finally:
        team.exchange = landed_exchange


def variant_call(kind, shape, variant):
    inner = rnnlab_call(kind, shape)

    def call():
        with patched(variant):
            return inner()
    return call


def forward_call(kind, shape):
    batch, steps, inputs, hidden = shape
    cell = getattr(rnnlab, kind)(hidden_size=hidden)
    params = cell.init(jax.random.PRNGKey(0), inputs)
    xs = jax.random.normal(jax.random.PRNGKey(1), (steps, batch, inputs))
    forward = jax.jit(lambda params, xs: rnnlab.scan(cell, params, xs)[0])
    return lambda: jax.block_until_ready(forward(params, xs))


VARIANTS = ("landed", "exchange last", "one read", "no read")


def lower_only() -> None:
    for kind, *shape in CASES:
        batch, steps, inputs, hidden = shape
        cell = getattr(rnnlab, kind)(hidden_size=hidden)
        params = cell.init(jax.random.PRNGKey(0), inputs)
        xs = jnp.ones((8, batch, inputs))
        texts = {}
        for variant in VARIANTS:  # a jit of its own each: one jit keeps its first lowering
            grad = jax.jit(jax.grad(lambda params, xs: jnp.mean(rnnlab.scan(cell, params, xs)[0] ** 2)))
            with patched(variant):
                texts[variant] = grad.trace(params, xs).lower(lowering_platforms=("cuda",)).as_text()
            print(kind, shape, variant, "Triton calls", texts[variant].count("xla.gpu.triton"),
                  "same program as landed" if texts[variant] == texts["landed"] else "", flush=True)
            # The plain RNN's forward stores nothing but h: storing it last changes nothing there.
            same = variant == "landed" or (variant == "exchange last" and kind == "RNN")
            assert (texts[variant] == texts["landed"]) == same, f"{variant}: the patch did not act as meant"


def main() -> None:
    print(f"probe_team_step: jax {jax.__version__} ({jax.default_backend()}, {jax.devices()[0].device_kind}), "
          f"{pallas._processors()} multiprocessors")
    rows = []
    for kind, *shape in CASES:
        calls = {variant: variant_call(kind, shape, variant) for variant in VARIANTS}
        calls["forward only"] = forward_call(kind, shape)
        medians, _, _ = blocked_medians(calls)
        steps = shape[1]
        rows.append([kind, ",".join(map(str, shape))] + [_ms(medians[name]) for name in calls]
                    + [f"{medians['landed'] / (2 * steps) * 1e6:.2f}"])
        print(*rows[-1], sep=" | ", flush=True)
    _table(("cell", "batch,T,input,hidden", *VARIANTS, "landed, forward only", "µs a step (landed, fwd+bwd)"), rows)


if __name__ == "__main__":
    lower_only() if "--lower" in sys.argv[1:] else main()
