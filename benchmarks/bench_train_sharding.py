"""Training with the batch split over devices (`rnnlab.train.train`'s ``batch_axes``): steps/s on 1 device against 2.

One model, an LSTM many-to-one on the adding problem (Adam, clipping, full BPTT), trained once per device count,
each in a fresh process (JAX fixes its device count when it starts; `rnnlab.sweep.use_cpu_cores` shows that many
CPU devices). The 1-device run is `train` without ``batch_axes``, the 2-device run the same call with the batch
split; the rounds alternate 1, 2, 1, 2, ... and each figure is the median over rounds of steps/s, timed from the end
of the warm-up steps (compilation) to the end of the run. Each step ends with the metrics fetched to the host, as in
every training run. "Cores busy" is the process's CPU time over the wall time of the timed steps.

On a CPU, the 1-device run already uses every core: XLA's intra-op thread pool runs its large ops on all of them
(on a quiet 2-core machine it keeps 1.8 cores busy). So the ratio shows what SPMD partitioning costs or gains on the
same cores (per-device work in parallel, against the all-reduce of the gradient and the partitioned program's
overhead), not a doubling of hardware. On a quiet 2-core machine: 0.9x (4.4-4.5 against 4.8-5.0 steps/s).

Then, per device count, one process fills a fresh persistent compilation cache and the next starts with it warm:
its first step (the compiled step loaded from the cache, and run) shows whether the split program is found there.

    python benchmarks/bench_train_sharding.py
    RNNLAB_BENCH_QUICK=1 python benchmarks/bench_train_sharding.py     # tiny sizes: checks the code runs

Prints the details, then the figures as rows ``| name | ours | peer | ratio | target | holds |``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import optax

import rnnlab
from rnnlab import models, sweep, tasks, train

QUICK = bool(os.environ.get("RNNLAB_BENCH_QUICK"))
#: (batch, T, hidden) of the model trained.
BATCH, SEQ_LEN, HIDDEN = (8, 10, 8) if QUICK else (256, 100, 128)
WARMUP_STEPS, TIMED_STEPS = (2, 3) if QUICK else (3, 20)
ROUNDS = 1 if QUICK else 3
DEVICE_COUNTS = (1, 2)


def measure(device_count: int) -> dict:
    """Train on ``device_count`` CPU devices (the batch split when more than one); steps/s and the losses."""
    sweep.use_cpu_cores(device_count)  # before the first computation of this process
    assert len(jax.devices()) == device_count, jax.devices()
    task = tasks.AddingProblem(SEQ_LEN)
    model = models.ManyToOne(rnnlab.LSTM(HIDDEN), task.output_size)
    times, cpu_times = [], []
    start = time.perf_counter()
    result = train.train(
        lambda params, batch: task.loss(model(params, batch["inputs"]), batch),
        model.init(jax.random.key(0), task.input_size), optax.adam(1e-3),
        lambda key: task.sample(key, BATCH), steps=WARMUP_STEPS + TIMED_STEPS, data_key=jax.random.key(1), clip=1.0,
        batch_axes={"inputs": 1, "targets": 0} if device_count > 1 else None, progress=False,
        callback=lambda step, params: (times.append(time.perf_counter()), cpu_times.append(time.process_time())))
    seconds = times[-1] - times[WARMUP_STEPS - 1]
    return {"devices": device_count, "steps_per_s": TIMED_STEPS / seconds, "losses": result.history["loss"].tolist(),
            "first_step_s": times[0] - start, "cores_busy": (cpu_times[-1] - cpu_times[WARMUP_STEPS - 1]) / seconds}


def run(device_count: int, cache: str | None = None) -> dict:
    """`measure` in a fresh process; with ``cache``, JAX's persistent compilation cache kept there."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    completed = subprocess.run([sys.executable, __file__, "--devices", str(device_count)], env=env,
                               capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    rates = {count: [] for count in DEVICE_COUNTS}
    first_step = {count: [] for count in DEVICE_COUNTS}
    cores_busy = {count: [] for count in DEVICE_COUNTS}
    losses = {}
    for _ in range(ROUNDS):
        for count in DEVICE_COUNTS:
            figures = run(count)
            rates[count].append(figures["steps_per_s"])
            first_step[count].append(figures["first_step_s"])
            cores_busy[count].append(figures["cores_busy"])
            losses[count] = figures["losses"]
    warm_first_step = {}
    for count in DEVICE_COUNTS:  # one process fills a fresh cache, the next starts with it warm
        with tempfile.TemporaryDirectory() as cache:
            run(count, cache)
            warm_first_step[count] = run(count, cache)["first_step_s"]
    median = {count: statistics.median(values) for count, values in rates.items()}
    loss_gap = float(np.max(np.abs(np.asarray(losses[2]) / np.asarray(losses[1]) - 1)))
    print(f"train sharding: LSTM many-to-one on the adding problem, batch {BATCH}, T {SEQ_LEN}, hidden {HIDDEN}, "
          f"Adam + clipping, full BPTT; {os.cpu_count()} CPU cores" + (", QUICK mode" if QUICK else ""))
    print("On CPU the 1-device run already uses every core through XLA's intra-op threads (see 'cores busy'): the "
          "ratio shows the overhead or benefit of SPMD partitioning on the same cores, not a doubling of hardware. "
          "A busy machine gives fewer cores to either run.")
    print(f"{WARMUP_STEPS} warm-up steps (compilation), then {TIMED_STEPS} timed; median of {ROUNDS} alternating "
          f"rounds, each in a fresh process.\n")
    for count in DEVICE_COUNTS:
        print(f"{count} device(s): {median[count]:.2f} steps/s (rounds: "
              f"{', '.join(f'{rate:.2f}' for rate in rates[count])}), {statistics.median(cores_busy[count]):.2f} "
              f"cores busy, first step (compile + run) {statistics.median(first_step[count]):.2f} s, with a warm "
              f"persistent compilation cache {warm_first_step[count]:.2f} s")
    print(f"\nlargest relative difference of the 2-device losses from the 1-device ones: {loss_gap:.1e}\n")
    ratio = median[2] / median[1]
    print("| name | ours | peer | ratio | target | holds |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| training steps/s, batch split over 2 CPU devices vs 1 (batch {BATCH}, T {SEQ_LEN}, hidden {HIDDEN}) "
          f"| {median[2]:.2f} | {median[1]:.2f} | {ratio:.2f}x | printed | info |")
    print(f"| first training step in a new process with a warm compilation cache, 2 CPU devices vs 1 "
          f"| {warm_first_step[2]:.2f} s | {warm_first_step[1]:.2f} s "
          f"| {warm_first_step[1] / warm_first_step[2]:.2f}x | printed | info |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--devices"]:
        print(json.dumps(measure(int(sys.argv[2]))))
    else:
        main()
