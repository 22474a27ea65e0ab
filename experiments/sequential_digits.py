"""Sequential digits: scikit-learn's 8×8 digits read one pixel per step (64 steps), plain and permuted, many-to-one.

    python experiments/sequential_digits.py --cells=gru,lstm --orders=plain,permuted --steps=1000

The small, offline cousin of (permuted) sequential MNIST (Le, Jaitly & Hinton 2015). The trivial baseline predicts
the training label frequencies: cross-entropy ≈ log 10 = 2.30 nats, accuracy ≈ 10%. The stated margin: a run
"beats the baseline" when its final test cross-entropy is below a quarter of the baseline's (and we report its test
accuracy against 10%). Writes to --out: records.csv (cell, order, seq_len, seed, step, train_loss, test_loss,
test_accuracy, max_grad_norm, nonfinite), summary.csv, records.json (config, command, versions, summary),
learning_curves.png and accuracy_curves.png. Restarted with the same --out it resumes, skipping finished units.
"""

from __future__ import annotations

from pathlib import Path

import jax
from absl import app, flags

from rnnlab import models, plots, sweep, tasks, train

import _training

flags.DEFINE_list("cells", ["gru", "lstm"], f"Cells from {sorted(sweep.CELLS)}.")
flags.DEFINE_list("orders", ["plain", "permuted"], "Pixel orders: plain (row by row) and/or permuted.")
flags.DEFINE_integer("seeds", 1, "Seeds 0 .. seeds-1.")
flags.DEFINE_integer("steps", 1000, "Training steps (batches).")
flags.DEFINE_integer("hidden_size", 64, "Hidden size.")
flags.DEFINE_integer("batch", 64, "Images per batch.")
flags.DEFINE_float("lr", 3e-3, "Adam learning rate.")
flags.DEFINE_float("clip", 1.0, "Clip gradients to this global norm (0: no clipping).")
flags.DEFINE_integer("eval_every", 100, "Evaluate on the 360 held-out images every this many steps.")
flags.DEFINE_float("margin", 0.25, "Success: final test cross-entropy below margin × baseline.")
flags.DEFINE_string("out", "results/sequential_digits", "Output folder; an existing one is resumed.")
FLAGS = flags.FLAGS

ORDERS = ("plain", "permuted")


def main(argv):
    del argv
    jax.config.update("jax_compilation_cache_dir", ".jax_cache")
    if unknown := set(FLAGS.orders) - set(ORDERS):
        raise app.UsageError(f"--orders must be from {ORDERS}, got {sorted(unknown)}.")
    config = {name: FLAGS[name].value for name in ("cells", "orders", "seeds", "steps", "hidden_size", "batch", "lr",
                                                   "clip", "eval_every")}
    out = Path(FLAGS.out)
    task_of = {order: tasks.SequentialDigits(permuted=order == "permuted") for order in FLAGS.orders}

    def run_unit(cell_name, order, seed):
        task = task_of[order]
        model = models.ManyToOne(sweep.make_cell(cell_name, FLAGS.hidden_size), task.output_size, unroll=8)
        result = train.train_on_task(task, model, seed=int(seed), steps=FLAGS.steps, batch_size=FLAGS.batch,
                                     learning_rate=FLAGS.lr, clip=FLAGS.clip, eval_every=FLAGS.eval_every,
                                     on_nonfinite="skip", log_every=FLAGS.eval_every * 5)
        return train.curve_records(result, cell=cell_name, order=order, seq_len=task.seq_len, seed=int(seed))

    units = [(c, o, s) for o in FLAGS.orders for c in FLAGS.cells for s in range(FLAGS.seeds)]
    table = _training.run_grid(out, config, units, run_unit)
    summary = []
    for order, task in task_of.items():
        baseline = task.baseline
        rows = _training.summarize({k: v[table["order"] == order] for k, v in table.items()}, ("cell", "order", "seed"),
                                   success=lambda loss, b=baseline: loss < FLAGS.margin * b)
        summary += [{**row, "baseline_loss": baseline, "baseline_accuracy": task.baseline_accuracy,
                     "loss_ratio": row["final_test_loss"] / baseline} for row in rows]
    _training.write_outputs(out, config, table, summary)
    plots.learning_curves(table, out / "learning_curves.png", panel="order", line="cell",
                          baseline=lambda order: task_of[order].baseline)
    plots.learning_curves(table, out / "accuracy_curves.png", panel="order", line="cell", metric="test_accuracy",
                          baseline=lambda order: task_of[order].baseline_accuracy, log=False)
    print(_training.format_rows(summary))
    print(f"\nwrote {out}/: records.csv, summary.csv, records.json, learning_curves.png, accuracy_curves.png")


if __name__ == "__main__":
    app.run(main)
