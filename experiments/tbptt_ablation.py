"""Truncated BPTT cannot learn a dependency longer than its window (Williams & Peng 1990; Sutskever 2013, §2.8.6).

    python experiments/tbptt_ablation.py --lag=8 --windows=4,8,16,32 --seq_len=64 --steps=300

The lag task echoes a bit stream --lag steps later (cross-entropy baseline log 2 = 0.693, accuracy 0.5). Each run
trains with k1 = k2 = window (an update every `window` steps, gradients through that chunk only; the carry is passed
on with its gradient stopped); window = seq_len is full BPTT. A loss at position j of a chunk can reach the bit it
needs only if j ≥ lag, so windows ≤ lag stay at chance and longer windows learn. Evaluation runs the whole sequence.
Writes records.csv (cell, window, seed, step, train_loss, test_loss, test_accuracy, ...), summary.csv,
records.json and learning_curves.png.
"""

from __future__ import annotations

from pathlib import Path

import jax
from absl import app, flags

from rnnlab import models, plots, sweep, tasks, train

import _training

flags.DEFINE_list("cells", ["gru"], f"Cells from {sorted(sweep.CELLS)}.")
flags.DEFINE_integer("lag", 8, "The lag L of the task.")
flags.DEFINE_list("windows", ["4", "8", "16", "32"], "Truncation windows k1 = k2 (each must divide --seq_len).")
flags.DEFINE_integer("seq_len", 64, "Sequence length T.")
flags.DEFINE_integer("seeds", 1, "Seeds 0 .. seeds-1.")
flags.DEFINE_integer("steps", 300, "Training steps (batches); each makes seq_len / window updates.")
flags.DEFINE_integer("hidden_size", 32, "Hidden size.")
flags.DEFINE_integer("batch", 32, "Sequences per batch.")
flags.DEFINE_float("lr", 3e-3, "Adam learning rate.")
flags.DEFINE_float("clip", 1.0, "Clip gradients to this global norm (0: no clipping).")
flags.DEFINE_integer("eval_every", 25, "Evaluate every this many steps.")
flags.DEFINE_string("out", "results/tbptt_ablation", "Output folder; an existing one is resumed.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    jax.config.update("jax_compilation_cache_dir", ".jax_cache")
    config = {name: FLAGS[name].value for name in ("cells", "lag", "windows", "seq_len", "seeds", "steps",
                                                   "hidden_size", "batch", "lr", "clip", "eval_every")}
    out = Path(FLAGS.out)
    task = tasks.LagTask(FLAGS.seq_len, FLAGS.lag)

    def run_unit(cell_name, window, seed):
        model = models.ManyToMany(sweep.make_cell(cell_name, FLAGS.hidden_size), task.output_size, unroll=4)
        result = train.train_on_task(task, model, seed=int(seed), steps=FLAGS.steps, batch_size=FLAGS.batch,
                                     learning_rate=FLAGS.lr, clip=FLAGS.clip, eval_every=FLAGS.eval_every,
                                     truncation=train.Truncation(int(window), int(window)), on_nonfinite="skip",
                                     log_every=FLAGS.eval_every * 4)
        return train.curve_records(result, cell=cell_name, window=int(window), seed=int(seed))

    units = [(c, int(w), s) for c in FLAGS.cells for w in FLAGS.windows for s in range(FLAGS.seeds)]
    table = _training.run_grid(out, config, units, run_unit)
    summary = _training.summarize(table, ("cell", "window", "seed"), success=lambda loss: loss < 0.1 * task.baseline)
    _training.write_outputs(out, config, table, summary)
    plots.learning_curves(table, out / "learning_curves.png", panel="cell", line="window",
                              metric="test_accuracy", log=False)
    print(f"lag L = {FLAGS.lag}; 'solved' means test cross-entropy < 0.1 · log 2\n")
    print(_training.format_rows(summary))
    print(f"\nwrote {out}/: records.csv, summary.csv, records.json, learning_curves.png")


if __name__ == "__main__":
    app.run(main)
