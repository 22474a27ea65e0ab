"""Gradient flow at initialisation and during training, cell by cell, on the adding problem (after Arjovsky, Shah &
Bengio 2016: the norm of the gradient of the loss with respect to each hidden state, before and after).

    python experiments/gradflow_training.py --cells=rnn_tanh,irnn,lstm,gru --seq_len=100 --steps=800

Each cell is trained as in experiments/adding_problem.py; at --measure_at steps (0 = initialisation, and the last
step) log10 ||dL/dh_t|| is measured for every t on a fixed batch of --measure_batch sequences with
`rnnlab.train.readout_grad_norms` (exact in the log domain, so a gradient of 1e-60 is a number, not 0). A cell whose
gradient at t = 0 is many decades below the one at t = T-1 gets almost no signal about the first marker. Writes to
--out: records.csv (learning curves: cell, seq_len, seed, step, train_loss, test_loss, ...), grad_norms.csv (cell,
seq_len, seed, step, t, lag, log10_grad_norm, test_loss), summary.csv (per cell and measured step: the decades lost
from t = T-1 to t = 0), records.json, grad_norms.png and learning_curves.png.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from rnnlab import models, plots, results, sweep, tasks, train

import _training

flags.DEFINE_list("cells", ["rnn_tanh", "irnn", "lstm", "gru"], f"Cells from {sorted(sweep.CELLS)}.")
flags.DEFINE_integer("seq_len", 100, "Sequence length T of the adding problem.")
flags.DEFINE_integer("seeds", 1, "Seeds 0 .. seeds-1.")
flags.DEFINE_integer("steps", 800, "Training steps (batches).")
flags.DEFINE_list("measure_at", ["0", "100", "200", "400"], "Steps at which to measure (the last step is added).")
flags.DEFINE_integer("measure_batch", 200, "Sequences in the fixed measurement batch.")
flags.DEFINE_integer("hidden_size", 64, "Hidden size.")
flags.DEFINE_integer("batch", 50, "Sequences per batch.")
flags.DEFINE_float("lr", 3e-3, "Adam learning rate.")
flags.DEFINE_float("clip", 1.0, "Clip gradients to this global norm (0: no clipping).")
flags.DEFINE_integer("eval_every", 100, "Evaluate on 1000 held-out sequences every this many steps.")
flags.DEFINE_string("out", "results/gradflow_training", "Output folder; an existing one is resumed.")
FLAGS = flags.FLAGS

FLOW = "flow_"  # prefix of the gradient-flow columns inside a unit's saved table


def main(argv):
    del argv
    jax.config.update("jax_compilation_cache_dir", ".jax_cache")
    config = {name: FLAGS[name].value for name in ("cells", "seq_len", "seeds", "steps", "measure_at",
                                                   "measure_batch", "hidden_size", "batch", "lr", "clip",
                                                   "eval_every")}
    out = Path(FLAGS.out)
    task = tasks.AddingProblem(FLAGS.seq_len)
    measure_at = sorted({int(step) for step in FLAGS.measure_at if int(step) <= FLAGS.steps} | {FLAGS.steps})
    measure_batch = task.sample(jax.random.key(10**6), FLAGS.measure_batch)
    lags = FLAGS.seq_len - 1 - np.arange(FLAGS.seq_len)

    def run_unit(cell_name, seed):
        model = models.ManyToOne(sweep.make_cell(cell_name, FLAGS.hidden_size), 1, unroll=8)
        measure = jax.jit(lambda params: train.readout_grad_norms(task, model, params, measure_batch))
        flow = {"step": [], "log10_grad_norm": []}

        def record(step, params):
            if step in measure_at:
                flow["step"].append(np.full(FLAGS.seq_len, step))
                flow["log10_grad_norm"].append(np.asarray(measure(params)))

        record(0, model.init(jax.random.fold_in(jax.random.key(int(seed)), 0), task.input_size))  # as train_on_task
        result = train.train_on_task(task, model, seed=int(seed), steps=FLAGS.steps, batch_size=FLAGS.batch,
                                     learning_rate=FLAGS.lr, clip=FLAGS.clip, eval_every=FLAGS.eval_every,
                                     on_nonfinite="skip", log_every=FLAGS.steps, callback=record)
        curves = train.curve_records(result, cell=cell_name, seq_len=FLAGS.seq_len, seed=int(seed))
        steps = np.concatenate(flow["step"])
        test_loss = dict(zip(result.evals["step"].astype(int).tolist(), result.evals["test_loss"].tolist()))
        flow_table = {"cell": np.full(steps.shape, cell_name), "seq_len": np.full(steps.shape, FLAGS.seq_len),
                      "seed": np.full(steps.shape, int(seed)), "step": steps,
                      "t": np.tile(np.arange(FLAGS.seq_len), len(flow["step"])),
                      "lag": np.tile(lags, len(flow["step"])),
                      "log10_grad_norm": np.concatenate(flow["log10_grad_norm"]),
                      "test_loss": np.asarray([test_loss.get(int(s), np.nan) for s in steps])}
        return {**curves, **{FLOW + name: values for name, values in flow_table.items()}}

    units = [(c, s) for c in FLAGS.cells for s in range(FLAGS.seeds)]
    both = _training.run_grid(out, config, units, run_unit)
    table = {name: values for name, values in both.items() if not name.startswith(FLOW)}
    flow = {name[len(FLOW):]: values for name, values in both.items() if name.startswith(FLOW)}
    summary = []
    for cell_name in FLAGS.cells:
        for seed in range(FLAGS.seeds):
            for step in measure_at:
                rows = (flow["cell"] == cell_name) & (flow["seed"] == seed) & (flow["step"] == step)
                norms = flow["log10_grad_norm"][rows]
                summary.append({"cell": cell_name, "seq_len": FLAGS.seq_len, "seed": seed, "step": step,
                                "log10_grad_norm_last": float(norms[-1]), "log10_grad_norm_first": float(norms[0]),
                                "decades_lost": float(norms[-1] - norms[0]),
                                "test_loss": float(flow["test_loss"][rows][0])})
    results.write_csv(out / "records.csv", table)
    results.write_csv(out / "grad_norms.csv", flow)
    results.write_csv(out / "summary.csv", {key: [row[key] for row in summary] for key in summary[0]})
    results.write_json(out / "records.json", {**results.provenance(), "config": config, "summary": summary})
    plots.grad_norms_during_training(flow, out / "grad_norms.png")
    plots.learning_curves(table, out / "learning_curves.png", panel="seq_len", line="cell",
                          baseline=lambda _: task.baseline)
    print(_training.format_rows(summary))
    print(f"\nwrote {out}/: records.csv, grad_norms.csv, summary.csv, records.json, grad_norms.png, "
          "learning_curves.png")


if __name__ == "__main__":
    app.run(main)
