"""Vanishing and exploding gradients across cells, gains, seeds and sequence lengths.

    python experiments/gradient_flow.py --cells=rnn_tanh,lstm,gru --gains=0.5,1,1.5 --seeds=2 --seq_lens=10,100,300

Writes to --out: records.csv (one row per cell, gain, seed, T, t), records.json (config, command, versions, commit,
device, summary), summary.csv, four PNG figures, and prints the summary table. Restarted with the same --out it
resumes, skipping the (cell, T) units already done. The maths lives in rnnlab.gradflow, rnnlab.theory, rnnlab.sweep.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
from absl import app, flags

from rnnlab import plots, results, sweep

flags.DEFINE_list("cells", ["rnn_tanh", "irnn", "lstm", "gru"],
                  f"Cells: names from {sorted(sweep.CELLS)} or module:Class for your own cell.")
flags.DEFINE_list("gains", ["0.5", "1.0", "1.5"], "Gains multiplying every recurrent weight block.")
flags.DEFINE_integer("seeds", 2, "Number of seeds (0 .. seeds-1): parameters and inputs.")
flags.DEFINE_list("seq_lens", ["10", "100", "300"], "Sequence lengths T.")
flags.DEFINE_integer("hidden_size", 32, "Hidden size.")
flags.DEFINE_integer("input_size", 8, "Input size.")
flags.DEFINE_integer("batch", 8, "Sequences per configuration.")
flags.DEFINE_float("input_std", 0.1, "Inputs are N(0, input_std^2).")
flags.DEFINE_integer("max_points", 300, "At most this many steps t per curve in records.csv (fits use these).")
flags.DEFINE_string("out", "results/gradient_flow_demo", "Run folder; an existing one is resumed.")
flags.DEFINE_string("compilation_cache", ".jax_cache", "JAX persistent compilation cache folder ('' for none).")
flags.DEFINE_integer("cpu_devices", 0, "CPU cores shown to JAX as devices, configurations sharded over them "
                     "(0: all cores).")
flags.DEFINE_string("coordinator", "", "Several hosts: the coordinator's host:port for jax.distributed.initialize "
                    "(with --num_processes and --process_id); every process runs this same command, configurations "
                    "are sharded over all their devices, and process 0 writes --out (a folder all of them see).")
flags.DEFINE_integer("num_processes", 1, "Several hosts: how many processes.")
flags.DEFINE_integer("process_id", 0, "Several hosts: this process's index.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    sweep.use_cpu_cores(FLAGS.cpu_devices or None)
    if FLAGS.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; accelerators use their own
        jax.distributed.initialize(FLAGS.coordinator, num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    if FLAGS.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
    sys.path.insert(0, str(Path.cwd()))  # so that --cells=my_module:MyCell finds the user's file
    config = {
        "cells": FLAGS.cells, "gains": [float(g) for g in FLAGS.gains], "seeds": FLAGS.seeds,
        "seq_lens": [int(n) for n in FLAGS.seq_lens], "hidden_size": FLAGS.hidden_size,
        "input_size": FLAGS.input_size, "batch": FLAGS.batch, "input_std": FLAGS.input_std,
        "max_points": FLAGS.max_points,
    }
    out = Path(FLAGS.out)
    run = results.RunFolder(out, config)
    table = sweep.gradient_flow(
        config["cells"], config["gains"], config["seeds"], config["seq_lens"], hidden_size=config["hidden_size"],
        input_size=config["input_size"], batch=config["batch"], input_std=config["input_std"],
        max_points=config["max_points"], run=run, progress=results.progress,
    )
    if jax.process_index() != 0:
        return
    summary = sweep.summarize(table)
    results.write_csv(out / "records.csv", table)
    results.write_csv(out / "summary.csv", {key: [row[key] for row in summary] for key in summary[0]})
    results.write_json(out / "records.json", {**results.provenance(), "config": config, "summary": summary})
    plots.grad_vs_lag(table, out / "grad_vs_lag.png")
    plots.heatmap(table, out / "heatmap.png")
    plots.rates_vs_gain(sweep.headline(summary), out / "rates_vs_gain.png")
    plots.first_step_vs_seq_len(table, out / "first_step_vs_seq_len.png")
    print(sweep.format_summary(summary))
    print(f"\nwrote {out}/: records.csv, records.json, summary.csv and 4 figures")


if __name__ == "__main__":
    app.run(main)
