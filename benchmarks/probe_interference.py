"""Probe: how a PyTorch call slows the rnnlab call that follows it (the reason `bench_cells.py` times in blocks).

For each cell at 32,100,64,128: rnnlab's gradient alone (30 calls in a row), right after a torch call, and after a
torch call and a 50 ms sleep; torch alone and in alternating blocks. Medians in ms. Not run by `make bench`.

    python benchmarks/probe_interference.py
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import torch

import rnnlab

BATCH, SEQ_LEN, INPUT, HIDDEN = 32, 100, 64, 128


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def probe(kind: str) -> str:
    cell = getattr(rnnlab, kind)(HIDDEN)
    params = cell.init(jax.random.PRNGKey(0), INPUT)
    xs = jax.random.normal(jax.random.PRNGKey(1), (SEQ_LEN, BATCH, INPUT))
    grad = jax.jit(jax.grad(lambda p, x: jnp.mean(rnnlab.scan(cell, p, x)[0] ** 2)))
    module, torch_xs = getattr(torch.nn, kind)(INPUT, HIDDEN), torch.randn(SEQ_LEN, BATCH, INPUT)

    def ours():
        jax.block_until_ready(grad(params, xs))

    def theirs():
        module.zero_grad()
        ys, _ = module(torch_xs)
        ys.square().mean().backward()

    ours(), theirs()
    alone = [_seconds(ours) for _ in range(30)]
    after, slept = [], []
    for _ in range(30):
        theirs()
        after.append(_seconds(ours))
    for _ in range(30):
        theirs()
        time.sleep(0.05)
        slept.append(_seconds(ours))
    torch_alone = [_seconds(theirs) for _ in range(30)]
    torch_after = []
    for _ in range(30):
        ours()
        torch_after.append(_seconds(theirs))
    ms = lambda ts: f"{statistics.median(ts) * 1e3:.1f}"  # noqa: E731
    return (f"| {kind} | {ms(alone)} | {ms(after)} | {ms(slept)} | {ms(torch_alone)} | {ms(torch_after)} |")


def main():
    torch.set_num_threads(2)
    print(f"rnnlab gradient at {BATCH},{SEQ_LEN},{INPUT},{HIDDEN} (ms, medians of 30)")
    print("| cell | rnnlab alone | right after torch | after torch + 50 ms | torch alone | torch right after rnnlab |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in ("GRU", "LSTM", "RNN"):
        print(probe(kind))


if __name__ == "__main__":
    main()
