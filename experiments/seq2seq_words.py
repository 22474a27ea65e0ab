"""Sequence to sequence: numbers written in digits → the same numbers in English words (305 → three hundred five).

    python experiments/seq2seq_words.py --cells=gru,lstm --max_digits=6 --steps=2000

An encoder–decoder (Sutskever, Vinyals & Le 2014) trained with teacher forcing and evaluated by greedy decoding on
numbers it never saw (`rnnlab.tasks.NumberWords`: 10% of the numbers of each length ≥ 3 are held out). The output
is 1 to 9 words and the end token for 1 to 6 digits. The trivial baseline ignores the input and predicts each
output position from the training words at that position: its cross-entropy, its token accuracy and its exact
match (0) are written beside the model's. The stated margin: a run "beats the baseline" when its greedy exact match
on the held-out numbers is at least --margin (default 0.8). Writes to --out: records.csv (cell, seq_len = max_digits,
seed, step, train_loss, test_loss, test_accuracy (teacher forced), test_exact_match, test_greedy_token_accuracy,
...), summary.csv, records.json, examples.txt (held-out numbers with their decoded words), learning_curves.png and
exact_match_curves.png.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from rnnlab import models, plots, sweep, tasks, train

import _training

flags.DEFINE_list("cells", ["gru", "lstm"], f"Cells (encoder and decoder alike) from {sorted(sweep.CELLS)}.")
flags.DEFINE_integer("max_digits", 6, "Numbers have 1 .. max_digits digits (3 to 6).")
flags.DEFINE_integer("seeds", 1, "Seeds 0 .. seeds-1.")
flags.DEFINE_integer("steps", 2000, "Training steps (batches).")
flags.DEFINE_integer("hidden_size", 128, "Hidden size of encoder and decoder.")
flags.DEFINE_integer("embed_size", 32, "Token embedding size.")
flags.DEFINE_integer("batch", 64, "Numbers per batch.")
flags.DEFINE_float("lr", 3e-3, "Adam learning rate.")
flags.DEFINE_float("clip", 1.0, "Clip gradients to this global norm (0: no clipping).")
flags.DEFINE_integer("eval_every", 250, "Evaluate on the held-out numbers every this many steps.")
flags.DEFINE_float("margin", 0.8, "Success: final greedy exact match on held-out numbers at least this.")
flags.DEFINE_integer("examples", 20, "Held-out numbers written to examples.txt per cell.")
flags.DEFINE_string("out", "results/seq2seq_words", "Output folder; an existing one is resumed.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    jax.config.update("jax_compilation_cache_dir", ".jax_cache")
    config = {name: FLAGS[name].value for name in ("cells", "max_digits", "seeds", "steps", "hidden_size",
                                                   "embed_size", "batch", "lr", "clip", "eval_every")}
    out = Path(FLAGS.out)
    task = tasks.NumberWords(max_digits=FLAGS.max_digits)
    examples = []

    def model_of(cell_name):
        return models.Seq2Seq(sweep.make_cell(cell_name, FLAGS.hidden_size),
                              sweep.make_cell(cell_name, FLAGS.hidden_size), task.src_vocab, task.tgt_vocab,
                              FLAGS.embed_size, bos=task.bos)

    def run_unit(cell_name, seed):
        model = model_of(cell_name)
        result = train.train_on_task(task, model, seed=int(seed), steps=FLAGS.steps, batch_size=FLAGS.batch,
                                     learning_rate=FLAGS.lr, clip=FLAGS.clip, eval_every=FLAGS.eval_every,
                                     on_nonfinite="skip", log_every=FLAGS.eval_every * 2)
        numbers = task.test_numbers[:: max(1, len(task.test_numbers) // FLAGS.examples)][: FLAGS.examples]
        batch = task.batch_of(numbers)
        decoded = model.decode(result.params, batch["inputs"], task.out_len, src_lengths=batch["lengths"])
        for number, tokens, truth in zip(np.asarray(numbers), np.asarray(decoded).T, np.asarray(batch["labels"]).T):
            words, expected = task.decode_words(tokens), task.decode_words(truth)
            examples.append(f"{cell_name} seed {seed}: {number:>7} -> {words}"
                            + ("" if words == expected else f"   (expected: {expected})"))
        return train.curve_records(result, cell=cell_name, seq_len=FLAGS.max_digits, seed=int(seed))

    units = [(c, s) for c in FLAGS.cells for s in range(FLAGS.seeds)]
    table = _training.run_grid(out, config, units, run_unit)
    baselines = {"baseline_loss": task.baseline, "baseline_token_accuracy": task.baseline_accuracy,
                 "baseline_exact_match": task.baseline_exact_match}
    summary = _training.summarize(table, ("cell", "seq_len", "seed"), metric="test_exact_match",
                                  success=lambda exact_match: exact_match >= FLAGS.margin)
    summary = [{**row, "final_greedy_token_accuracy": float(table["test_greedy_token_accuracy"][
        (table["cell"] == row["cell"]) & (table["seed"] == row["seed"])][-1]), **baselines} for row in summary]
    _training.write_outputs(out, config, table, summary)
    if examples:  # written by the run that trained; a resumed run that trained nothing keeps the old file
        (out / "examples.txt").write_text("\n".join(examples) + "\n")
    plots.learning_curves(table, out / "learning_curves.png", panel="seq_len", line="cell",
                          baseline=lambda _: baselines["baseline_loss"])
    plots.learning_curves(table, out / "exact_match_curves.png", panel="seq_len", line="cell",
                          metric="test_exact_match", log=False)
    print(_training.format_rows(summary))
    print(f"held-out numbers: {len(task.test_numbers)}; baseline: {baselines}")
    print(f"\nwrote {out}/: records.csv, summary.csv, records.json, examples.txt, learning_curves.png, "
          "exact_match_curves.png")


if __name__ == "__main__":
    app.run(main)
