"""Initialisation on the adding problem: identity (IRNN, Le, Jaitly & Hinton 2015), orthogonal (Saxe et al. 2014)
and scaled normal, for ReLU and tanh RNNs.

    python experiments/init_ablation.py --seq_lens=50 --steps=800

Writes records.csv (cell, init, seq_len, seed, step, train_loss, test_loss, ...), summary.csv, records.json and
learning_curves.png. Success is test MSE < 0.01 (baseline 0.167).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from absl import app, flags

import rnnlab
from rnnlab import models, plots, tasks, train

import _training

INITS = {
    "identity": rnnlab.init.identity(1.0),
    "orthogonal": rnnlab.init.orthogonal(1.0),
    "scaled_normal": rnnlab.init.scaled_normal(1.0),
}

flags.DEFINE_list("activations", ["relu", "tanh"], "RNN activations.")
flags.DEFINE_list("inits", list(INITS), f"Recurrent initialisers from {sorted(INITS)}.")
flags.DEFINE_list("seq_lens", ["50"], "Sequence lengths T.")
flags.DEFINE_integer("seeds", 1, "Seeds 0 .. seeds-1.")
flags.DEFINE_integer("steps", 800, "Training steps.")
flags.DEFINE_integer("hidden_size", 64, "Hidden size.")
flags.DEFINE_integer("batch", 50, "Sequences per batch.")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate.")
flags.DEFINE_float("clip", 1.0, "Clip gradients to this global norm (0: none).")
flags.DEFINE_integer("eval_every", 50, "Evaluate every this many steps.")
flags.DEFINE_string("out", "results/init_ablation", "Output folder; an existing one is resumed.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    jax.config.update("jax_compilation_cache_dir", ".jax_cache")
    config = {name: FLAGS[name].value for name in ("activations", "inits", "seq_lens", "seeds", "steps",
                                                   "hidden_size", "batch", "lr", "clip", "eval_every")}
    out = Path(FLAGS.out)

    def run_unit(activation, init_name, seq_len, seed):
        cell = rnnlab.RNN(FLAGS.hidden_size, activation=activation, recurrent_init=INITS[init_name])
        result = train.train_on_task(tasks.AddingProblem(int(seq_len)), models.ManyToOne(cell, 1, unroll=8),
                                     seed=int(seed), steps=FLAGS.steps, batch_size=FLAGS.batch,
                                     learning_rate=FLAGS.lr, clip=FLAGS.clip, eval_every=FLAGS.eval_every,
                                     on_nonfinite="skip", log_every=FLAGS.steps)
        return train.curve_records(result, cell=f"rnn_{activation}", init=init_name, seq_len=int(seq_len),
                                   seed=int(seed))

    units = [(a, i, int(t), s) for t in FLAGS.seq_lens for a in FLAGS.activations for i in FLAGS.inits
             for s in range(FLAGS.seeds)]
    table = _training.run_grid(out, config, units, run_unit)
    table["setting"] = np.asarray([f"{c}/{i}" for c, i in zip(table["cell"], table["init"])])
    summary = _training.summarize(table, ("cell", "init", "seq_len", "seed"), success=lambda mse: mse < 0.01)
    _training.write_outputs(out, config, table, summary)
    plots.learning_curves(table, out / "learning_curves.png", panel="seq_len", line="setting",
                              baseline=lambda _: tasks.AddingProblem.baseline)
    print(_training.format_rows(summary))
    print(f"\nwrote {out}/: records.csv, summary.csv, records.json, learning_curves.png")


if __name__ == "__main__":
    app.run(main)
