"""The training experiments end to end at a tiny size (each script in a subprocess, as a user runs it): the files they
write, their columns, and their numbers against the task's trivial baseline; the new tasks against closed forms."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnlab import results, tasks

ROOT = Path(__file__).parents[1]
CURVE_COLUMNS = {"cell", "seq_len", "seed", "step", "train_loss", "test_loss"}


def _run(script: str, out: Path, *flags: str) -> dict[str, np.ndarray]:
    """Run ``experiments/<script>`` with ``flags`` writing to ``out``; return its records.csv."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run([sys.executable, str(ROOT / "experiments" / script), f"--out={out}", *flags],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    provenance = json.loads((out / "records.json").read_text())
    assert script in provenance["command"] and provenance["versions"]["jax"]
    return results.read_csv(out / "records.csv")


def test_sequential_digits_script_beats_chance(tmp_path):
    table = _run("sequential_digits.py", tmp_path, "--cells=gru", "--orders=permuted", "--steps=120",
                 "--hidden_size=32", "--lr=1e-2", "--eval_every=60")
    assert CURVE_COLUMNS | {"order", "test_accuracy"} <= set(table)
    assert set(table["order"]) == {"permuted"} and set(table["seq_len"]) == {64}
    assert table["test_loss"][-1] < 0.8 * math.log(10)
    assert table["test_accuracy"][-1] > 0.3  # chance: 0.1
    assert {"learning_curves.png", "accuracy_curves.png", "summary.csv"} <= {p.name for p in tmp_path.iterdir()}


def test_sequential_digits_majority_baseline():
    task = tasks.SequentialDigits()
    majority = np.argmax(np.bincount(np.asarray(task.train_labels), minlength=10))
    assert task.baseline_accuracy == pytest.approx(np.mean(np.asarray(task.test_labels) == majority))
    assert 0.05 < task.baseline_accuracy < 0.15


def test_seq2seq_words_script_beats_the_input_blind_baseline(tmp_path):
    table = _run("seq2seq_words.py", tmp_path, "--cells=gru", "--max_digits=3", "--steps=200", "--hidden_size=64",
                 "--lr=1e-2", "--eval_every=100", "--examples=5")
    assert CURVE_COLUMNS | {"test_exact_match", "test_greedy_token_accuracy"} <= set(table)
    task = tasks.NumberWords(max_digits=3)
    assert table["test_loss"][-1] < 0.5 * task.baseline
    assert table["test_greedy_token_accuracy"][-1] > 2 * task.baseline_accuracy
    assert table["test_exact_match"][-1] > 0.1 > task.baseline_exact_match
    examples = (tmp_path / "examples.txt").read_text().splitlines()
    assert len(examples) == 5 and "hundred" in examples[0]


@pytest.mark.parametrize("number, words", [(0, "zero"), (7, "seven"), (13, "thirteen"), (40, "forty"),
                                           (305, "three hundred five"), (1042, "one thousand forty two"),
                                           (100000, "one hundred thousand"),
                                           (999999, "nine hundred ninety nine thousand nine hundred ninety nine")])
def test_number_to_words(number, words):
    assert " ".join(tasks.number_to_words(number)) == words


def test_number_words_tables_split_and_sampling():
    task = tasks.NumberWords(max_digits=4)
    everything = task.batch_of(jnp.arange(10**4))
    for number in range(0, 10**4, 7):
        tokens = np.asarray(everything["labels"][:, number])
        assert task.decode_words(tokens) == " ".join(tasks.number_to_words(number))
        length = int(everything["lengths"][number])
        assert length == len(str(number))
        assert "".join(map(str, np.asarray(everything["inputs"][:length, number]))) == str(number)
        assert float(everything["weights"][:, number].sum()) == len(tasks.number_to_words(number)) + 1
    train_numbers, test_numbers = set(np.asarray(task.train_numbers)), set(np.asarray(task.test_numbers))
    assert not train_numbers & test_numbers and set(range(100)) <= train_numbers
    assert len(train_numbers) + round(0.1 * 900) + round(0.1 * 9000) == 10**4
    # A batch draws the number of digits uniformly, and never a held-out number.
    batch = jax.device_get(task.sample(jax.random.key(0), 20000))
    digits = np.bincount(batch["lengths"], minlength=5)[1:]
    np.testing.assert_allclose(digits / digits.sum(), 0.25, atol=0.015)
    numbers = [int("".join(map(str, batch["inputs"][:n, i]))) for i, n in enumerate(batch["lengths"][:2000])]
    assert not set(numbers) & test_numbers


def test_number_words_baseline_is_the_positional_frequency_model():
    """The baseline's word distribution per position, against frequencies counted in sampled training batches."""
    task = tasks.NumberWords(max_digits=4)
    batch = jax.device_get(task.sample(jax.random.key(1), 40000))
    exact = task._position_frequencies()
    for position in range(task.out_len):
        counted = np.bincount(batch["labels"][position], minlength=len(tasks.WORDS)) / batch["labels"].shape[1]
        np.testing.assert_allclose(counted, exact[position], atol=0.01)
    test = jax.device_get(task.test_batch())
    picked = exact[np.arange(task.out_len)[:, None], test["labels"]]
    assert task.baseline == pytest.approx(np.sum(-np.log(picked) * test["weights"]) / test["weights"].sum())
    # A model that outputs log-frequencies as logits ignores its input: its loss is the baseline.
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(exact, jnp.float32) + 1e-30)[:, None], test["labels"].shape +
                              (len(tasks.WORDS),))
    assert float(task.loss(logits, test)) == pytest.approx(task.baseline, rel=1e-5)
    assert 0 < task.baseline_accuracy < 0.2 and task.baseline_exact_match == 0.0
