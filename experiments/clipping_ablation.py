"""Gradient clipping tames exploding gradients (Pascanu, Mikolov & Bengio 2013).

    python experiments/clipping_ablation.py --gains=1.0,2.0,4.0 --clips=0,1 --seq_len=50 --steps=400

A tanh RNN whose recurrent matrix is gain · (orthogonal) trains on the adding problem with plain SGD, with and
without clipping by global norm (clip 0 = none). Non-finite updates are dropped and counted (never applied). Writes
records.csv (cell, gain, clip, seed, step, train_loss, test_loss, max_grad_norm, nonfinite), summary.csv,
records.json and two figures: test loss and the largest gradient norm between evaluations.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import optax
from absl import app, flags

import rnnlab
from rnnlab import models, plots, tasks, train

import _training

flags.DEFINE_list("gains", ["1.0", "2.0", "4.0"], "Gains of the orthogonal recurrent matrix.")
flags.DEFINE_list("clips", ["0", "1"], "Global-norm clip values (0: no clipping).")
flags.DEFINE_integer("seq_len", 50, "Adding-problem sequence length T.")
flags.DEFINE_integer("seeds", 1, "Seeds 0 .. seeds-1.")
flags.DEFINE_integer("steps", 400, "Training steps.")
flags.DEFINE_integer("hidden_size", 64, "Hidden size.")
flags.DEFINE_integer("batch", 50, "Sequences per batch.")
flags.DEFINE_float("lr", 0.05, "SGD learning rate.")
flags.DEFINE_integer("eval_every", 20, "Evaluate every this many steps.")
flags.DEFINE_string("out", "results/clipping_ablation", "Output folder; an existing one is resumed.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    jax.config.update("jax_compilation_cache_dir", ".jax_cache")
    config = {name: FLAGS[name].value for name in ("gains", "clips", "seq_len", "seeds", "steps", "hidden_size",
                                                   "batch", "lr", "eval_every")}
    out = Path(FLAGS.out)
    task = tasks.AddingProblem(FLAGS.seq_len)

    def run_unit(gain, clip, seed):
        cell = rnnlab.RNN(FLAGS.hidden_size, recurrent_init=rnnlab.init.orthogonal(float(gain)))
        model = models.ManyToOne(cell, 1, unroll=8)
        result = train.train_on_task(task, model, seed=int(seed), steps=FLAGS.steps, batch_size=FLAGS.batch,
                                     learning_rate=FLAGS.lr, optimizer=optax.sgd(FLAGS.lr), clip=float(clip),
                                     eval_every=FLAGS.eval_every, on_nonfinite="skip", log_every=FLAGS.steps)
        return train.curve_records(result, cell="rnn_tanh", gain=float(gain), clip=float(clip), seed=int(seed))

    units = [(float(g), float(c), s) for g in FLAGS.gains for c in FLAGS.clips for s in range(FLAGS.seeds)]
    table = _training.run_grid(out, config, units, run_unit)
    table["setting"] = np.asarray([f"clip={c:g}" for c in table["clip"]])
    summary = _training.summarize(table, ("gain", "clip", "seed"), success=lambda mse: mse < 0.01)
    for row in summary:
        mask = (table["gain"] == row["gain"]) & (table["clip"] == row["clip"]) & (table["seed"] == row["seed"])
        row["max_grad_norm"] = float(max(table["max_grad_norm"][mask][1:], default=float("nan")))
    _training.write_outputs(out, config, table, summary)
    plots.learning_curves(table, out / "learning_curves.png", panel="gain", line="setting",
                              baseline=lambda _: tasks.AddingProblem.baseline)
    plots.learning_curves(table, out / "grad_norms.png", panel="gain", line="setting", metric="max_grad_norm")
    print(_training.format_rows(summary))
    print(f"\nwrote {out}/: records.csv, summary.csv, records.json, learning_curves.png, grad_norms.png")


if __name__ == "__main__":
    app.run(main)
