"""Forecasting the yearly sunspot numbers (1700–2008, shipped inside statsmodels) one year ahead, against persistence.

    python experiments/sunspots.py --cells=gru,lstm --seeds=3 --steps=600

The last --test_years years are held out (`rnnlab.tasks.Sunspots`). A many-to-many model reads the series and
predicts the next year at every step; training uses windows of --seq_len years from the training years; the test
score is the MSE over the held-out years with the model having read the whole history before each. The baseline
is persistence (next year = this year); the stated margin: a run "beats the baseline" when its held-out MSE is at
most --margin (default 0.8) times persistence's. Writes to --out: records.csv (cell, seq_len, seed, step,
train_loss, test_loss (standardised MSE), test_rmse (sunspot units), ...), summary.csv, records.json,
learning_curves.png and forecast.png (the held-out years, the forecasts and persistence).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from rnnlab import models, plots, sweep, tasks, train

import _training

flags.DEFINE_list("cells", ["gru", "lstm"], f"Cells from {sorted(sweep.CELLS)}.")
flags.DEFINE_integer("seq_len", 40, "Years per training window.")
flags.DEFINE_integer("test_years", 60, "The last this many years are held out.")
flags.DEFINE_integer("seeds", 3, "Seeds 0 .. seeds-1.")
flags.DEFINE_integer("steps", 600, "Training steps (batches).")
flags.DEFINE_integer("hidden_size", 32, "Hidden size.")
flags.DEFINE_integer("batch", 32, "Windows per batch.")
flags.DEFINE_float("lr", 3e-3, "Adam learning rate.")
flags.DEFINE_float("clip", 1.0, "Clip gradients to this global norm (0: no clipping).")
flags.DEFINE_integer("eval_every", 50, "Evaluate on the held-out years every this many steps.")
flags.DEFINE_float("margin", 0.8, "Success: held-out MSE at most margin × persistence's.")
flags.DEFINE_string("out", "results/sunspots", "Output folder; an existing one is resumed.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    jax.config.update("jax_compilation_cache_dir", ".jax_cache")
    config = {name: FLAGS[name].value for name in ("cells", "seq_len", "test_years", "seeds", "steps",
                                                   "hidden_size", "batch", "lr", "clip", "eval_every")}
    out = Path(FLAGS.out)
    task = tasks.Sunspots(seq_len=FLAGS.seq_len, test_years=FLAGS.test_years)
    forecasts = {}

    def run_unit(cell_name, seed):
        model = models.ManyToMany(sweep.make_cell(cell_name, FLAGS.hidden_size), 1)
        result = train.train_on_task(task, model, seed=int(seed), steps=FLAGS.steps, batch_size=FLAGS.batch,
                                     learning_rate=FLAGS.lr, clip=FLAGS.clip, eval_every=FLAGS.eval_every,
                                     on_nonfinite="skip", log_every=FLAGS.steps)
        predictions, _ = model(result.params, task.test_batch()["inputs"])
        forecasts[(cell_name, int(seed))] = np.asarray(predictions)[:, 0, 0] * task.std + task.mean
        records = train.curve_records(result, cell=cell_name, seq_len=FLAGS.seq_len, seed=int(seed))
        return {**records, "test_rmse": np.sqrt(records["test_loss"]) * task.std}

    units = [(c, s) for c in FLAGS.cells for s in range(FLAGS.seeds)]
    table = _training.run_grid(out, config, units, run_unit)
    summary = _training.summarize(table, ("cell", "seq_len", "seed"),
                                  success=lambda mse: mse <= FLAGS.margin * task.baseline)
    baselines = {"persistence_mse": task.baseline, "persistence_rmse": math.sqrt(task.baseline) * task.std,
                 "mean_mse": task.mean_baseline}
    summary = [{**row, "final_test_rmse": math.sqrt(row["final_test_loss"]) * task.std,
                "ratio_to_persistence": row["final_test_loss"] / task.baseline, **baselines} for row in summary]
    _training.write_outputs(out, config, table, summary)
    plots.learning_curves(table, out / "learning_curves.png", panel="seq_len", line="cell",
                          baseline=lambda _: task.baseline)
    if forecasts:  # drawn by the run that trained; a resumed run that trained nothing keeps the old figure
        plots.forecasts(task.years[1:], np.asarray(task.series[1:]) * task.std + task.mean, forecasts,
                        out / "forecast.png", first=task.train_years - 1)
    print(_training.format_rows(summary))
    print(f"baselines: {baselines}")
    print(f"\nwrote {out}/: records.csv, summary.csv, records.json, learning_curves.png, forecast.png")


if __name__ == "__main__":
    app.run(main)
