"""The copy task (Arjovsky, Shah & Bengio 2016): recall 10 symbols after a delay T.

    python experiments/copy_task.py --cells=lstm,gru --delays=10,20 --steps=1500

The memoryless baseline is 10 log 8 / (T + 20) nats per step; "solved" means test cross-entropy below a tenth of it.
Writes records.csv (cell, delay, seed, step, train_loss, test_loss, test_accuracy = recalled symbols exactly
right, ...), summary.csv, records.json and learning_curves.png.
"""

from __future__ import annotations

from pathlib import Path

import jax
from absl import app, flags

from rnnlab import models, plots, sweep, tasks, train

import _training

flags.DEFINE_list("cells", ["lstm", "gru"], f"Cells from {sorted(sweep.CELLS)}.")
flags.DEFINE_list("delays", ["10", "20"], "Delays T.")
flags.DEFINE_integer("seeds", 1, "Seeds 0 .. seeds-1.")
flags.DEFINE_integer("steps", 1500, "Training steps.")
flags.DEFINE_integer("hidden_size", 64, "Hidden size.")
flags.DEFINE_integer("batch", 32, "Sequences per batch.")
flags.DEFINE_float("lr", 3e-3, "Adam learning rate.")
flags.DEFINE_float("clip", 1.0, "Clip gradients to this global norm (0: none).")
flags.DEFINE_integer("eval_every", 100, "Evaluate every this many steps.")
flags.DEFINE_string("out", "results/copy_task", "Output folder; an existing one is resumed.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    jax.config.update("jax_compilation_cache_dir", ".jax_cache")
    config = {name: FLAGS[name].value for name in ("cells", "delays", "seeds", "steps", "hidden_size", "batch", "lr",
                                                   "clip", "eval_every")}
    out = Path(FLAGS.out)

    def run_unit(cell_name, delay, seed):
        task = tasks.CopyTask(int(delay))
        model = models.ManyToMany(sweep.make_cell(cell_name, FLAGS.hidden_size), task.output_size, unroll=8)
        result = train.train_on_task(task, model, seed=int(seed), steps=FLAGS.steps, batch_size=FLAGS.batch,
                                     learning_rate=FLAGS.lr, clip=FLAGS.clip, eval_every=FLAGS.eval_every,
                                     test_size=500, on_nonfinite="skip", log_every=FLAGS.eval_every * 5)
        return train.curve_records(result, cell=cell_name, delay=int(delay), seed=int(seed))

    units = [(c, int(d), s) for d in FLAGS.delays for c in FLAGS.cells for s in range(FLAGS.seeds)]
    table = _training.run_grid(out, config, units, run_unit)
    summary = []
    for delay in sorted({int(d) for d in FLAGS.delays}):
        baseline = tasks.CopyTask(delay).baseline
        rows = _training.summarize({k: v[table["delay"] == delay] for k, v in table.items()},
                                   ("cell", "delay", "seed"), success=lambda loss, b=baseline: loss < 0.1 * b)
        summary += [{**row, "baseline": baseline} for row in rows]
    _training.write_outputs(out, config, table, summary)
    plots.learning_curves(table, out / "learning_curves.png", panel="delay", line="cell",
                              baseline=lambda delay: tasks.CopyTask(int(delay)).baseline)
    print(_training.format_rows(summary))
    print(f"\nwrote {out}/: records.csv, summary.csv, records.json, learning_curves.png")


if __name__ == "__main__":
    app.run(main)
