"""The adding problem (U[0,1] variant of Arjovsky et al. 2016): which cells learn a lag of T steps?

    python experiments/adding_problem.py --cells=lstm,gru,rnn_tanh,irnn --seq_lens=100 --seeds=1 --steps=1200

Success is test MSE < 0.01 (baseline: 0.167, predicting 1). Writes to --out: records.csv (cell, seq_len, seed, step,
train_loss, test_loss, max_grad_norm, nonfinite), summary.csv, records.json (config, command, versions, summary) and
learning_curves.png; prints the success table. Restarted with the same --out it resumes, skipping finished units.
The longer sweep of the issue: --seq_lens=50,100,200,400 --seeds=3 --steps=4000. For long lags, --remat=sqrt
rematerialises BPTT (`models.ManyToOne(..., remat=k)`): the gradient then stores memory growing as √T, not T.
"""

from __future__ import annotations

from pathlib import Path

import jax
from absl import app, flags

import rnnlab
from rnnlab import models, plots, sweep, tasks, train

import _training

flags.DEFINE_list("cells", ["lstm", "gru", "rnn_tanh", "irnn"], f"Cells from {sorted(sweep.CELLS)}.")
flags.DEFINE_list("seq_lens", ["100"], "Sequence lengths T.")
flags.DEFINE_integer("seeds", 1, "Seeds 0 .. seeds-1.")
flags.DEFINE_integer("steps", 1200, "Training steps (batches).")
flags.DEFINE_integer("hidden_size", 64, "Hidden size.")
flags.DEFINE_integer("batch", 50, "Sequences per batch.")
flags.DEFINE_float("lr", 3e-3, "Adam learning rate.")
flags.DEFINE_float("clip", 1.0, "Clip gradients to this global norm (0: no clipping).")
flags.DEFINE_integer("eval_every", 100, "Evaluate on 1000 held-out sequences every this many steps.")
flags.DEFINE_integer("unroll", 8, "Steps per scan iteration (speed only).")
flags.DEFINE_string("remat", "", "Rematerialised BPTT for long T (the same numbers; memory growing as √T): 'sqrt' "
                    "for chunks of the divisor of each T nearest √T, or a chunk length dividing every T; empty: off.")
flags.DEFINE_string("out", "results/adding_problem", "Output folder; an existing one is resumed.")
FLAGS = flags.FLAGS

SUCCESS_MSE = 0.01


def main(argv):
    del argv
    jax.config.update("jax_compilation_cache_dir", ".jax_cache")
    config = {name: FLAGS[name].value for name in ("cells", "seq_lens", "seeds", "steps", "hidden_size", "batch",
                                                   "lr", "clip", "eval_every", "unroll")}
    if FLAGS.remat:  # only then, so that runs from before the flag still resume
        config["remat"] = FLAGS.remat
    out = Path(FLAGS.out)

    def remat(seq_len: int) -> int | None:
        if not FLAGS.remat:
            return None
        return rnnlab.remat_near_sqrt(seq_len) if FLAGS.remat == "sqrt" else int(FLAGS.remat)

    def run_unit(cell_name, seq_len, seed):
        model = models.ManyToOne(sweep.make_cell(cell_name, FLAGS.hidden_size), 1, unroll=FLAGS.unroll,
                                 remat=remat(int(seq_len)))
        result = train.train_on_task(tasks.AddingProblem(int(seq_len)), model, seed=int(seed), steps=FLAGS.steps,
                                     batch_size=FLAGS.batch, learning_rate=FLAGS.lr, clip=FLAGS.clip,
                                     eval_every=FLAGS.eval_every, on_nonfinite="skip", log_every=FLAGS.eval_every)
        return train.curve_records(result, cell=cell_name, seq_len=int(seq_len), seed=int(seed))

    units = [(c, int(t), s) for t in FLAGS.seq_lens for c in FLAGS.cells for s in range(FLAGS.seeds)]
    table = _training.run_grid(out, config, units, run_unit)
    summary = _training.summarize(table, ("cell", "seq_len", "seed"), success=lambda mse: mse < SUCCESS_MSE)
    _training.write_outputs(out, config, table, summary)
    plots.learning_curves(table, out / "learning_curves.png", panel="seq_len", line="cell",
                              baseline=lambda _: tasks.AddingProblem.baseline)
    print(_training.format_rows(summary))
    print(f"\nwrote {out}/: records.csv, summary.csv, records.json, learning_curves.png")


if __name__ == "__main__":
    app.run(main)
