"""Probe (GPU): where a step of the Pallas kernels' teams goes (`rnnlab.native.pallas._Team`), to choose what to
attack next at the long thin shape (batch 16, T = 1000), where the GRU's teams are at 0.5x of cuDNN (run 9).

Each cell's training-style call (`bench_cells.rnnlab_call`) is compiled four ways, all timed in one process as
`bench_cells.py` times (`blocked_medians`), with a forward-only call beside the first:

- ``landed``: the kernels as they are;
- ``exchange first``: each forward step stores its units of ``h`` (what the team waits for) before the LSTM's cell
  state and gates or the GRU's gates and ``a_n``, not after (the backward kernels and the plain RNN's forward
  store nothing else first: the same program there);
- ``one read``: every program reads the step's row once and goes on, without waiting for the team: the wrong
  numbers (sentinel NaNs), timed to show what waiting for the slowest program and for the stores to arrive costs;
- ``no read``: the row read is of step 0's, cached (not volatile), and nothing is waited for: the step without the
  exchange's trip through L2, i.e. the matmuls, gate maths, loads of the inputs and stores.

Then, at the two cuDNN misses of run 9 and the LSTM beside them (batch 16, T = 1000, hidden 128), the same call with
other team sizes (`pallas.team_size` patched; `SIZE_CASES`): the plain RNN, one program as landed, as a team of 2 and
of 4, and the LSTM and GRU, 4 programs as landed, as a team of 8 (16 units each, the narrowest `MIN_UNITS` takes: the
step's matmuls halved, the exchange the same). Each size's gradients are compared with the landed size's before
timing (the largest difference relative to the largest gradient), so a size that runs wrong shows as such.

Not run by `make bench`; `benchmarks/gpu.sh` runs it (part ``team``). ``--lower``: on a machine without a GPU, lower
each variant and each team size for CUDA only (checks the patches apply and each size's grid; with jax 0.10, whose
Pallas lowers Triton calls without a GPU).

    python benchmarks/probe_team_step.py
"""

from __future__ import annotations

import contextlib
import re
import sys

import jax
import jax.numpy as jnp
from bench_cells import _ms, _table, blocked_medians, rnnlab_call

import rnnlab
from rnnlab.native import pallas

#: (cell, batch, T, input, hidden)
CASES = (("LSTM", 16, 1000, 32, 128), ("GRU", 16, 1000, 32, 128), ("RNN", 64, 200, 128, 256))
#: (cell, batch, T, input, hidden, team sizes): the landed size first (`pallas.team_size`), then the others timed.
SIZE_CASES = (("RNN", 16, 1000, 32, 128, (1, 2, 4)), ("GRU", 16, 1000, 32, 128, (4, 8)),
              ("LSTM", 16, 1000, 32, 128, (4, 8)))


@contextlib.contextmanager
def patched(variant: str):
    """`pallas` changed for ``variant`` (while a call runs: it is traced and lowered at its first)."""
    team, saved = pallas._Team, (pallas._Team.store, pallas._Team.exchange)
    landed_store, landed_exchange = saved

    def exchange_first_store(self, ref, t, blocks):
        if getattr(self, "queued", None) is None:
            self.queued = []
        self.queued.append((ref, t, blocks))  # stored after the exchange's own store

    def exchange_first(self, ref, t, blocks, waiting):
        landed_store(self, ref, t, blocks)
        for queued in self.__dict__.pop("queued", []):
            landed_store(self, *queued)
        team.store = lambda *_: None  # the landed exchange's own store: done above
        try:
            return landed_exchange(self, ref, t, blocks, waiting)
        finally:
            team.store = exchange_first_store

    def without_waiting(cached: bool):
        def exchange(self, ref, t, blocks, waiting):
            landed_store(self, ref, t, blocks)
            if self.size == 1:
                return blocks, waiting
            from jax.experimental.pallas import triton as pallas_triton

            row = 0 if cached else t
            return [pallas_triton.load(ref.at[row, :, self.whole(k)], volatile=not cached)
                    for k in range(len(blocks))], waiting
        return exchange

    try:
        if variant == "exchange first":
            team.store, team.exchange = exchange_first_store, exchange_first
        elif variant in ("one read", "no read"):
            team.exchange = without_waiting(cached=variant == "no read")
        yield
    finally:
        team.store, team.exchange = saved


@contextlib.contextmanager
def team_of(size: int):
    """`pallas.team_size` giving ``size`` programs per 16 rows, whatever the shape (while a call runs: it is traced
    and lowered at its first)."""
    landed = pallas.team_size
    pallas.team_size = lambda w_h_shape, batch: size
    try:
        yield
    finally:
        pallas.team_size = landed


def sized_call(kind, shape, size):
    inner = rnnlab_call(kind, shape)

    def call():
        with team_of(size):
            return inner()
    return call


def difference(grads, reference) -> float:
    """The largest difference between two gradients' leaves, relative to the reference's largest element."""
    pairs = zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(reference), strict=True)
    return max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in pairs)


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


VARIANTS = ("landed", "exchange first", "one read", "no read")


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
            # The plain RNN's forward stores nothing but h: storing it first changes nothing there.
            same = variant == "landed" or (variant == "exchange first" and kind == "RNN")
            assert (texts[variant] == texts["landed"]) == same, f"{variant}: the patch did not act as meant"
    for kind, *shape, sizes in SIZE_CASES:
        batch, steps, inputs, hidden = shape
        cell = getattr(rnnlab, kind)(hidden_size=hidden)
        params = cell.init(jax.random.PRNGKey(0), inputs)
        xs = jnp.ones((8, batch, inputs))
        gates = params["w_h"].shape[1] // hidden
        assert sizes[0] == pallas.team_size((hidden, gates * hidden), batch), "SIZE_CASES: the landed size first"
        for size in sizes:
            grad = jax.jit(jax.grad(lambda params, xs: jnp.mean(rnnlab.scan(cell, params, xs)[0] ** 2)))
            with team_of(size):
                text = grad.trace(params, xs).lower(lowering_platforms=("cuda",)).as_text()
            grids = re.findall(r"grid_x = (\d+)", text)
            print(kind, shape, f"team of {size}: Triton calls", text.count("xla.gpu.triton"), "grids", grids,
                  flush=True)
            assert grids == [str(size)] * 2, f"team of {size}: lowered with grids {grids}"


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
    print()
    rows = []
    for kind, *shape, sizes in SIZE_CASES:
        calls = {f"team of {size}": sized_call(kind, shape, size) for size in sizes}
        grads = {name: call() for name, call in calls.items()}  # compiled here, and checked against the landed size
        landed = next(iter(grads.values()))
        medians, fastest, _ = blocked_medians(calls)
        for name in calls:
            rows.append([kind, ",".join(map(str, shape)), name, f"{medians[name] * 1e3:.3g} ms",
                         f"{fastest[name] * 1e3:.3g} ms", f"{medians[name] / (2 * shape[1]) * 1e6:.2f}",
                         f"{difference(grads[name], landed):.1e}"])
            print(*rows[-1], sep=" | ", flush=True)
    _table(("cell", "batch,T,input,hidden", "programs per 16 rows (first: landed)", "median", "fastest",
            "µs a step (fwd+bwd)", "largest difference from landed"), rows)


if __name__ == "__main__":
    lower_only() if "--lower" in sys.argv[1:] else main()
