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


@pytest.mark.slow  # 21 s; many-to-one classification is tested in test_models, the script in `make test-all`
def test_sequential_digits_script_beats_chance(tmp_path):
    table = _run("sequential_digits.py", tmp_path, "--cells=gru", "--orders=permuted", "--steps=120",
                 "--hidden_size=32", "--lr=1e-2", "--eval_every=60")
    assert CURVE_COLUMNS | {"order", "test_accuracy"} <= set(table)
    assert set(table["order"]) == {"permuted"} and set(table["seq_len"]) == {64}
    assert table["test_loss"][-1] < 0.8 * math.log(10)
    assert table["test_accuracy"][-1] > 0.3  # chance: 0.1
    assert {"learning_curves.png", "accuracy_curves.png", "summary.csv"} <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.slow  # 50 s: two runs of the script; ManyToOne's remat itself is tested in test_models
def test_adding_problem_script_with_remat_gives_the_numbers_without(tmp_path):
    flags = ("--cells=lstm,rnn_tanh", "--seq_lens=12", "--steps=4", "--eval_every=2", "--hidden_size=16", "--batch=8")
    plain = _run("adding_problem.py", tmp_path / "plain", *flags)
    remat = _run("adding_problem.py", tmp_path / "remat", *flags, "--remat=sqrt")
    assert set(plain) == set(remat) and CURVE_COLUMNS <= set(plain)
    for column in ("train_loss", "test_loss", "max_grad_norm"):
        np.testing.assert_allclose(remat[column], plain[column], rtol=1e-5)
    assert json.loads((tmp_path / "remat" / "records.json").read_text())["config"]["remat"] == "sqrt"


def test_sequential_digits_majority_baseline():
    task = tasks.SequentialDigits()
    majority = np.argmax(np.bincount(np.asarray(task.train_labels), minlength=10))
    assert task.baseline_accuracy == pytest.approx(np.mean(np.asarray(task.test_labels) == majority))
    assert 0.05 < task.baseline_accuracy < 0.15


@pytest.mark.slow  # 25 s; the seq2seq model's learning is tested in test_models, the script in `make test-all`
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


@pytest.mark.slow  # 29 s; CharCorpus and the training loop are tested here and in test_train, the script in
# `make test-all`
def test_char_lm_script_beats_unigram_and_writes_samples(tmp_path):
    table = _run("char_lm.py", tmp_path, "--steps=100", "--hidden_size=64", "--seq_len=32", "--lr=1e-2",
                 "--eval_every=100", "--sample_len=40", "--temperatures=0,1")
    assert CURVE_COLUMNS | {"test_bits_per_char"} <= set(table)
    unigram_bits = tasks.CharCorpus(seq_len=32).baseline / math.log(2)
    assert table["test_bits_per_char"][-1] < 0.95 * unigram_bits
    np.testing.assert_allclose(table["test_bits_per_char"], table["test_loss"] / math.log(2), rtol=1e-6)
    samples = (tmp_path / "samples.txt").read_text()
    assert samples.count("=== lstm, seed 0, temperature") == 2
    provenance = json.loads((tmp_path / "records.json").read_text())
    assert len(provenance["config"]["corpus"]["sha256"]) == 64


def test_char_corpus_split_windows_and_unigram_baseline():
    import sysconfig

    task = tasks.CharCorpus(seq_len=16)
    assert task.digest == tasks.CharCorpus(seq_len=16).digest  # the same files, the same corpus
    last = (Path(sysconfig.get_paths()["stdlib"]) / task.files[-1]).read_text(encoding="utf-8")
    assert task.decode(task.test_tokens[-100:]) == last[-100:]  # held out: the tail of each file
    assert len(task.test_tokens) == pytest.approx(0.1 * (len(task.train_tokens) + len(task.test_tokens)), rel=0.01)
    batch = task.sample(jax.random.key(0), 4)
    np.testing.assert_array_equal(np.argmax(batch["inputs"][1:], -1), batch["labels"][:-1])  # next character
    assert task.encode(task.decode(batch["labels"][:, 0])).tolist() == np.asarray(batch["labels"][:, 0]).tolist()
    test = task.test_batch()
    np.testing.assert_array_equal(np.asarray(test["labels"]).T.ravel(),
                                  np.asarray(task.test_tokens[1:1 + test["labels"].size]))
    # The unigram model as logits: its loss is the baseline, and the baseline is the training-text entropy's cousin.
    counts = np.bincount(np.asarray(task.train_tokens), minlength=task.input_size) + 1.0
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(counts / counts.sum(), jnp.float32)), test["labels"].shape +
                              (task.input_size,))
    assert float(task.loss(logits, test)) == pytest.approx(task.baseline, rel=1e-5)
    train_entropy = -np.sum(counts / counts.sum() * np.log(counts / counts.sum()))
    assert task.baseline == pytest.approx(train_entropy, rel=0.05)


@pytest.mark.slow  # 14 s; the sunspots task is tested here, many-to-many models in test_models, the script in
# `make test-all`
def test_sunspots_script_beats_persistence(tmp_path):
    table = _run("sunspots.py", tmp_path, "--cells=gru", "--seeds=1", "--steps=100", "--eval_every=50")
    assert CURVE_COLUMNS | {"test_rmse"} <= set(table)
    assert table["test_loss"][-1] < tasks.Sunspots().baseline
    assert {"forecast.png", "learning_curves.png"} <= {p.name for p in tmp_path.iterdir()}


def test_sunspots_standardisation_and_persistence_baseline():
    from statsmodels.datasets import sunspots

    raw = np.asarray(sunspots.load_pandas().data["SUNACTIVITY"], np.float64)
    task = tasks.Sunspots(seq_len=20, test_years=60)
    assert len(raw) == 309 and task.train_years == 249
    series = np.asarray(task.series, np.float64)
    assert abs(series[:249].mean()) < 1e-5 and series[:249].std() == pytest.approx(1.0, rel=1e-5)
    expected = np.mean((raw[249:] - raw[248:-1]) ** 2) / raw[:249].std() ** 2
    assert task.baseline == pytest.approx(expected, rel=1e-6)
    test = task.test_batch()
    assert float(test["weights"].sum()) == 60
    assert float(task.loss(test["inputs"], test)) == pytest.approx(task.baseline, rel=1e-5)  # persistence itself
    batch = jax.device_get(task.sample(jax.random.key(0), 64))
    np.testing.assert_array_equal(batch["inputs"][1:], batch["targets"][:-1])
    assert batch["targets"].max() <= series[:249].max() + 1e-6  # windows stay inside the training years
    assert np.isin(batch["targets"].ravel(), series[:249].astype(np.float32)).all()


@pytest.mark.slow  # 21 s; the readout's gradient norms are tested below, the sweep's in test_sweep, the script
# in `make test-all`
def test_gradflow_training_script(tmp_path):
    _run("gradflow_training.py", tmp_path, "--cells=lstm", "--seq_len=20", "--steps=20",
         "--measure_at=0,10", "--eval_every=10", "--measure_batch=16", "--hidden_size=16")
    flow = results.read_csv(tmp_path / "grad_norms.csv")
    assert {"cell", "seq_len", "seed", "step", "t", "lag", "log10_grad_norm", "test_loss"} <= set(flow)
    assert set(flow["step"]) == {0, 10, 20} and len(flow["t"]) == 3 * 20
    assert np.isfinite(flow["log10_grad_norm"]).all()
    assert {"grad_norms.png", "learning_curves.png", "summary.csv"} <= {p.name for p in tmp_path.iterdir()}


def test_readout_grad_norms_against_perturbed_hidden_states():
    """dL/dh_t as the gradient of the loss with respect to a perturbation added to h_t, in a hand-written loop."""
    import rnnlab
    from rnnlab import models, train

    jax.config.update("jax_enable_x64", True)
    try:
        task = tasks.AddingProblem(12)
        model = models.ManyToOne(rnnlab.RNN(6), 1)
        params = model.init(jax.random.key(0), 2, jnp.float64)
        batch = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), task.sample(jax.random.key(1), 5))

        def loss(deltas):
            h = jnp.zeros((5, 6))
            for t in range(12):
                h, _ = model.cell(params["cell"], h, batch["inputs"][t])
                h = h + deltas[t]
            return task.loss(models.dense(params["readout"], h), batch)

        expected = jnp.log10(jnp.linalg.norm(jax.grad(loss)(jnp.zeros((12, 5, 6))).reshape(12, -1), axis=1))
        measured = train.readout_grad_norms(task, model, params, batch)
        np.testing.assert_allclose(measured, expected, rtol=1e-6, atol=1e-9)
    finally:
        jax.config.update("jax_enable_x64", False)
