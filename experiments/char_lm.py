"""A character-level language model on Python standard-library source files, with sampled text (one-to-many).

    python experiments/char_lm.py --cells=lstm --steps=1200

The corpus is a fixed list of standard-library modules (`rnnlab.tasks.STDLIB_FILES`, read from
``sysconfig.get_paths()["stdlib"]``; its sha256 goes into records.json), the last 10% of each file held out. The
baseline is the unigram model (training character frequencies), in bits per character on the held-out text. The
stated margin: a run "beats the baseline" when its held-out bits per character are at most --margin (default 0.7)
times the unigram's. After training, the model reads --prompt and generates --sample_len characters at each of
--temperatures (feeding each sample back in), written to samples.txt. Writes to --out: records.csv (cell, seq_len,
seed, step, train_loss, test_loss (nats), test_bits_per_char, test_accuracy, ...), summary.csv, records.json,
samples.txt and learning_curves.png (bits per character).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags

from rnnlab import models, plots, results, sweep, tasks, train

import _training

flags.DEFINE_list("cells", ["lstm"], f"Cells from {sorted(sweep.CELLS)}.")
flags.DEFINE_integer("seq_len", 128, "Characters per training window (truncation length).")
flags.DEFINE_integer("seeds", 1, "Seeds 0 .. seeds-1.")
flags.DEFINE_integer("steps", 1200, "Training steps (batches).")
flags.DEFINE_integer("hidden_size", 128, "Hidden size.")
flags.DEFINE_integer("batch", 32, "Windows per batch.")
flags.DEFINE_float("lr", 3e-3, "Adam learning rate.")
flags.DEFINE_float("clip", 1.0, "Clip gradients to this global norm (0: no clipping).")
flags.DEFINE_integer("eval_every", 100, "Evaluate on the held-out text every this many steps.")
flags.DEFINE_float("margin", 0.7, "Success: held-out bits per char at most margin × the unigram baseline's.")
flags.DEFINE_string("prompt", "def ", "Text the model reads before generating.")
flags.DEFINE_integer("sample_len", 400, "Characters generated per sample.")
flags.DEFINE_list("temperatures", ["0.5", "0.8", "1.0"], "Sampling temperatures (0: greedy).")
flags.DEFINE_string("out", "results/char_lm", "Output folder; an existing one is resumed.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    jax.config.update("jax_compilation_cache_dir", ".jax_cache")
    config = {name: FLAGS[name].value for name in ("cells", "seq_len", "seeds", "steps", "hidden_size", "batch",
                                                   "lr", "clip", "eval_every")}
    out = Path(FLAGS.out)
    task = tasks.CharCorpus(seq_len=FLAGS.seq_len)
    baseline_bits = task.baseline / math.log(2)
    samples = []

    def run_unit(cell_name, seed):
        model = models.ManyToMany(sweep.make_cell(cell_name, FLAGS.hidden_size), task.output_size, unroll=8)
        result = train.train_on_task(task, model, seed=int(seed), steps=FLAGS.steps, batch_size=FLAGS.batch,
                                     learning_rate=FLAGS.lr, clip=FLAGS.clip, eval_every=FLAGS.eval_every,
                                     on_nonfinite="skip", log_every=FLAGS.eval_every)
        prompt = jnp.asarray(task.encode(FLAGS.prompt))[:, None]
        for temperature in map(float, FLAGS.temperatures):
            key = jax.random.fold_in(jax.random.key(int(seed)), 3)
            tokens = models.generate(model, result.params, key, prompt, FLAGS.sample_len,
                                     vocab_size=task.input_size, temperature=temperature)
            samples.append(f"=== {cell_name}, seed {seed}, temperature {temperature:g} ===\n"
                           f"{FLAGS.prompt}{task.decode(tokens[:, 0])}\n")
        records = train.curve_records(result, cell=cell_name, seq_len=FLAGS.seq_len, seed=int(seed))
        return {**records, "test_bits_per_char": records["test_loss"] / math.log(2)}

    units = [(c, s) for c in FLAGS.cells for s in range(FLAGS.seeds)]
    table = _training.run_grid(out, config, units, run_unit)
    summary = _training.summarize(table, ("cell", "seq_len", "seed"), metric="test_bits_per_char",
                                  success=lambda bits: bits <= FLAGS.margin * baseline_bits)
    summary = [{**row, "baseline_bits_per_char": baseline_bits,
                "ratio_to_baseline": row["final_test_bits_per_char"] / baseline_bits} for row in summary]
    corpus = {"files": list(task.files), "sha256": task.digest, "train_chars": int(task.train_tokens.shape[0]),
              "test_chars": int(task.test_tokens.shape[0]), "vocabulary_size": task.input_size}
    _training.write_outputs(out, {**config, "corpus": corpus}, table, summary)
    if samples:  # written by the run that trained; a resumed run that trained nothing keeps the old file
        results.write_json(out / "samples.json", {"prompt": FLAGS.prompt, "samples": samples})
        (out / "samples.txt").write_text("\n".join(samples))
    plots.learning_curves(table, out / "learning_curves.png", panel="seq_len", line="cell",
                          metric="test_bits_per_char", baseline=lambda _: baseline_bits, log=False)
    print(_training.format_rows(summary))
    print(f"unigram baseline: {baseline_bits:.3f} bits per char; corpus {corpus}")
    print(f"\nwrote {out}/: records.csv, summary.csv, records.json, samples.txt, learning_curves.png")


if __name__ == "__main__":
    app.run(main)
