r"""Tasks: batch generators that are pure functions of a `jax.random` key, each with its trivial baseline.

Every batch is a dict of time-major arrays (``inputs [T, batch, I]`` first); ``task.sample(key, batch_size)`` gives
the same batch for the same key. ``task.loss(predictions, batch)`` is the task's own loss (MSE or cross-entropy in
nats) and ``task.baseline`` the loss of the best predictor that remembers nothing, in closed form.

=======================  ==================================================  ==========================================
task                     source                                              memoryless baseline
=======================  ==================================================  ==========================================
`AddingProblem`          Hochreiter & Schmidhuber 1997; U[0,1] variant of    ``Var(a + b) = 2/12 = 0.167`` (predict 1)
                         Arjovsky, Shah & Bengio 2016
`CopyTask`               Arjovsky, Shah & Bengio 2016                        ``10 log 8 / (T + 20)``
`LagTask`                a bit stream echoed ``lag`` steps later             ``log 2``
`SequentialDigits`       scikit-learn's 8×8 digits, pixel by pixel (the      entropy of the labels (≈ ``log 10``)
                         small cousin of sequential MNIST, Le et al. 2015)
`NumberWords`            numbers in digits → English words (seq2seq:         per-position word frequencies (the input
                         output length differs from input length)            ignored)
`CharCorpus`             characters of Python standard-library sources       unigram character frequencies
                         (a character language model)
`Sunspots`               yearly sunspot numbers 1700–2008 (statsmodels),     persistence: ``x̂_{t+1} = x_t``
                         one step ahead
=======================  ==================================================  ==========================================
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from rnnlab.models import cross_entropy, weighted_mean


def _check_positive(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class AddingProblem:
    r"""The adding problem, U[0,1] variant (Arjovsky et al. 2016, §4.2; after Hochreiter & Schmidhuber 1997).

    Two input streams of length ``seq_len``: values ``a_t ~ U[0, 1]`` and markers, zero except one 1 in the first
    half and one in the second half. The target is the sum of the two marked values. Predicting its mean, 1, gives
    MSE ``Var(a + b) = 2 · 1/12 = 0.167``: the baseline. Solved means test MSE < 0.01.

    **Batch:** ``inputs [T, B, 2]`` (value, marker), ``targets [B, 1]``.
    """

    seq_len: int
    input_size = 2
    output_size = 1
    baseline = 1.0 / 6.0

    def __post_init__(self):
        _check_positive("seq_len", self.seq_len)
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (one marker in each half), got {self.seq_len}.")

    def sample(self, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
        key_values, key_first, key_second = jax.random.split(key, 3)
        half = self.seq_len // 2
        values = jax.random.uniform(key_values, (self.seq_len, batch_size))
        first = jax.random.randint(key_first, (batch_size,), 0, half)
        second = jax.random.randint(key_second, (batch_size,), half, self.seq_len)
        steps = jnp.arange(self.seq_len)[:, None]
        markers = ((steps == first) | (steps == second)).astype(values.dtype)
        targets = jnp.sum(values * markers, axis=0)[:, None]
        return {"inputs": jnp.stack([values, markers], axis=-1), "targets": targets}

    def loss(self, predictions: jax.Array, batch) -> jax.Array:
        """Mean squared error of ``predictions [B, 1]``."""
        return jnp.mean((predictions - batch["targets"]) ** 2)


@dataclasses.dataclass(frozen=True)
class CopyTask:
    r"""The copy task (Arjovsky et al. 2016, §4.1; after Hochreiter & Schmidhuber 1997).

    Input of length ``delay + 2 · copy_len``: ``copy_len`` symbols drawn uniformly from ``1..num_symbols``, then
    ``delay - 1`` blanks (0), a delimiter (``num_symbols + 1``) and ``copy_len`` blanks. The output is blank for
    ``delay + copy_len`` steps and then repeats the symbols. A memoryless model predicts blank, then uniformly over
    the symbols: cross-entropy ``copy_len · log(num_symbols) / (delay + 2 · copy_len)`` per step.

    **Batch:** ``inputs [T, B, num_symbols + 2]`` (one-hot), ``labels [T, B]`` in ``0..num_symbols``.
    """

    delay: int
    num_symbols: int = 8
    copy_len: int = 10

    def __post_init__(self):
        for name in ("delay", "num_symbols", "copy_len"):
            _check_positive(name, getattr(self, name))

    @property
    def seq_len(self) -> int:
        return self.delay + 2 * self.copy_len

    @property
    def input_size(self) -> int:
        return self.num_symbols + 2

    @property
    def output_size(self) -> int:
        return self.num_symbols + 1

    @property
    def baseline(self) -> float:
        return self.copy_len * math.log(self.num_symbols) / self.seq_len

    def sample(self, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
        symbols = jax.random.randint(key, (self.copy_len, batch_size), 1, self.num_symbols + 1)
        blanks = jnp.zeros((self.delay - 1, batch_size), symbols.dtype)
        delimiter = jnp.full((1, batch_size), self.num_symbols + 1, symbols.dtype)
        tail = jnp.zeros((self.copy_len, batch_size), symbols.dtype)
        tokens = jnp.concatenate([symbols, blanks, delimiter, tail])
        labels = jnp.concatenate([jnp.zeros((self.delay + self.copy_len, batch_size), symbols.dtype), symbols])
        return {"inputs": jax.nn.one_hot(tokens, self.input_size), "labels": labels}

    def loss(self, logits: jax.Array, batch) -> jax.Array:
        """Mean cross-entropy (nats) over all steps of ``logits [T, B, num_symbols + 1]``."""
        return jnp.mean(cross_entropy(logits, batch["labels"]))

    def accuracy(self, logits: jax.Array, batch) -> jax.Array:
        """Fraction of the ``copy_len`` recalled symbols predicted exactly (argmax)."""
        recalled = slice(self.delay + self.copy_len, None)
        return jnp.mean(jnp.argmax(logits[recalled], -1) == batch["labels"][recalled])


@dataclasses.dataclass(frozen=True)
class LagTask:
    r"""Echo a random bit stream ``lag`` steps later: the task with a known lag for the truncated-BPTT ablation.

    Bits ``b_t ~ Bernoulli(1/2)`` arrive as ``x_t = 2 b_t - 1``; at every step ``t ≥ lag`` the label is
    ``b_{t-lag}`` (steps ``t < lag`` carry weight 0). Nothing before ``t - lag + 1`` helps, so without memory of
    ``lag`` steps the cross-entropy is ``log 2``; a model that can see ``lag`` steps back reaches 0. Truncated BPTT
    whose window cannot span the lag never receives the gradient that would teach it.

    **Batch:** ``inputs [T, B, 1]``, ``labels [T, B]``, ``weights [T, B]``.
    """

    seq_len: int
    lag: int
    input_size = 1
    output_size = 2
    baseline = math.log(2.0)

    def __post_init__(self):
        _check_positive("seq_len", self.seq_len)
        _check_positive("lag", self.lag)
        if self.lag >= self.seq_len:
            raise ValueError(f"lag must be below seq_len; got lag={self.lag}, seq_len={self.seq_len}.")

    def sample(self, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
        bits = jax.random.bernoulli(key, 0.5, (self.seq_len, batch_size)).astype(jnp.int32)
        labels = jnp.concatenate([jnp.zeros((self.lag, batch_size), jnp.int32), bits[: -self.lag]])
        weights = (jnp.arange(self.seq_len) >= self.lag)[:, None] * jnp.ones((1, batch_size))
        return {"inputs": (2.0 * bits - 1.0)[..., None], "labels": labels, "weights": weights}

    def loss(self, logits: jax.Array, batch) -> jax.Array:
        """Weighted mean cross-entropy (nats) of ``logits [T, B, 2]``; a chunk of a batch works the same."""
        return weighted_mean(cross_entropy(logits, batch["labels"]), batch["weights"])

    def accuracy(self, logits: jax.Array, batch) -> jax.Array:
        return weighted_mean(jnp.argmax(logits, -1) == batch["labels"], batch["weights"])


@dataclasses.dataclass(frozen=True, eq=False)
class SequentialDigits:
    r"""scikit-learn's 8×8 handwritten digits (1797 images, 10 classes) read one pixel per step: 64 steps of one
    feature in ``[0, 1]``, classified from the last step — a small, offline cousin of sequential MNIST (Le, Jaitly &
    Hinton 2015). ``permuted=True`` applies one fixed random permutation of the 64 pixels (drawn from
    ``permutation_seed``), which spreads neighbouring pixels far apart in time.

    The split is fixed: 360 test images (drawn with ``split_seed``), the rest for training. The baseline is the
    cross-entropy of the training label frequencies on the test set (≈ log 10: the classes are balanced);
    ``baseline_accuracy`` that of always answering the most frequent training label (≈ 10%).

    **Batch:** ``inputs [64, B, 1]``, ``labels [B]``.
    """

    permuted: bool = False
    permutation_seed: int = 0
    split_seed: int = 0
    test_size: int = 360
    input_size = 1
    output_size = 10
    seq_len = 64

    def __post_init__(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.asarray(digits.data, np.float32) / 16.0
        labels = np.asarray(digits.target, np.int32)
        if self.permuted:
            images = images[:, np.random.default_rng(self.permutation_seed).permutation(images.shape[1])]
        order = np.random.default_rng(self.split_seed).permutation(len(labels))
        test, train = order[: self.test_size], order[self.test_size:]
        object.__setattr__(self, "train_images", jnp.asarray(images[train]))
        object.__setattr__(self, "train_labels", jnp.asarray(labels[train]))
        object.__setattr__(self, "test_images", jnp.asarray(images[test]))
        object.__setattr__(self, "test_labels", jnp.asarray(labels[test]))

    @property
    def baseline(self) -> float:
        prior = np.bincount(np.asarray(self.train_labels), minlength=10) / len(self.train_labels)
        test = np.asarray(self.test_labels)
        return float(-np.mean(np.log(prior[test])))

    @property
    def baseline_accuracy(self) -> float:
        """Test accuracy of always predicting the most frequent training label (≈ 10%: chance)."""
        majority = np.argmax(np.bincount(np.asarray(self.train_labels), minlength=10))
        return float(np.mean(np.asarray(self.test_labels) == majority))

    @staticmethod
    def _batch(images: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        return {"inputs": images.T[..., None], "labels": labels}

    def sample(self, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
        index = jax.random.randint(key, (batch_size,), 0, self.train_labels.shape[0])
        return self._batch(self.train_images[index], self.train_labels[index])

    def test_batch(self) -> dict[str, jax.Array]:
        return self._batch(self.test_images, self.test_labels)

    def loss(self, logits: jax.Array, batch) -> jax.Array:
        return jnp.mean(cross_entropy(logits, batch["labels"]))

    def accuracy(self, logits: jax.Array, batch) -> jax.Array:
        return jnp.mean(jnp.argmax(logits, -1) == batch["labels"])


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
#: The target vocabulary of `NumberWords`: start (also padding after the end), end, then the words.
WORDS = ("<s>", "</s>", *_ONES, *_TENS, "hundred", "thousand")


def _below_thousand(number: int) -> list[str]:
    hundreds, rest = divmod(number, 100)
    words = [_ONES[hundreds], "hundred"] if hundreds else []
    if rest >= 20:
        words.append(_TENS[rest // 10 - 2])
        rest %= 10
    return words + ([_ONES[rest]] if rest else [])


def number_to_words(number: int) -> list[str]:
    """English words of ``0 ≤ number < 10^6``, without "and" or hyphens: ``1042 -> one thousand forty two``."""
    if not 0 <= number < 10**6:
        raise ValueError(f"number must be in [0, 10^6), got {number}.")
    if number == 0:
        return ["zero"]
    thousands, rest = divmod(number, 1000)
    return (_below_thousand(thousands) + ["thousand"] if thousands else []) + _below_thousand(rest)


def _number_tables(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(digits [count, D], lengths [count], labels [count, U])`` of the numbers ``0 .. count-1``: digits padded
    with 10, word indices (`WORDS`) ending with ``</s>`` and padded with ``<s>``. Built from the 1000 three-digit
    groups, vectorised, because a Python loop over 10^6 numbers takes seconds."""
    index = {word: i for i, word in enumerate(WORDS)}
    groups = [[index[w] for w in _below_thousand(k)] for k in range(1000)]
    group_len = np.asarray([len(g) for g in groups])
    group_tokens = np.zeros((1000, 4), np.int64)
    for k, tokens in enumerate(groups):
        group_tokens[k, : len(tokens)] = tokens
    numbers = np.arange(count)
    lengths = np.searchsorted(10 ** np.arange(1, 7), numbers, side="right") + 1
    width = int(lengths.max())
    place = lengths[:, None] - 1 - np.arange(width)[None, :]
    digits = np.where(place >= 0, (numbers[:, None] // 10 ** np.maximum(place, 0)) % 10, 10)
    thousands, rest = np.divmod(numbers, 1000)
    head = np.where(thousands > 0, group_len[thousands] + 1, 0)  # words up to and including "thousand"
    tail = np.where((rest > 0) | (numbers == 0), np.maximum(group_len[rest], 1), 0)  # 0 is "zero"
    rest_tokens = np.where(numbers[:, None] == 0, index["zero"], group_tokens[rest])
    out_len = int((head + tail).max()) + 1
    labels = np.full((count, out_len), WORDS.index("<s>"), np.int8)
    for j in range(out_len):
        from_thousands = group_tokens[thousands, np.minimum(j, 3)]
        from_rest = rest_tokens[numbers, np.clip(j - head, 0, 3)]
        labels[:, j] = np.select(
            [j < head - 1, j == head - 1, (j >= head) & (j < head + tail), j == head + tail],
            [from_thousands, index["thousand"], from_rest, index["</s>"]], labels[:, j])
    return digits.astype(np.int8), lengths.astype(np.int32), labels


@dataclasses.dataclass(frozen=True, eq=False)
class NumberWords:
    r"""Numbers written in digits → the same numbers in English words: sequence to sequence, the output's length
    differing from the input's (``305 -> three hundred five </s>``: 3 tokens in, 4 out).

    Numbers have 1 to ``max_digits`` digits. A batch draws the number of digits uniformly, then a training number of
    that many digits uniformly, so short numbers are not drowned by long ones. Held out, never trained on: a fixed
    ``test_fraction`` (drawn with ``split_seed``) of the numbers of each length ≥ 3; the test batch holds up to
    ``test_size`` of them, equally many per length. (The 100 numbers of 1 or 2 digits are all for training.)

    The input-blind baseline predicts each output position from the training distribution of the words at that
    position: ``baseline`` is its cross-entropy on the test batch, ``baseline_accuracy`` the token accuracy of the
    most frequent word per position, ``baseline_exact_match`` the share of test numbers whose words are exactly that
    positional-majority sequence.

    **Batch:** ``inputs [max_digits, B]`` digits (padding 10 beyond ``lengths``), ``lengths [B]``, ``labels [U, B]``
    word indices into `WORDS` ending with ``</s>`` then padded with ``<s>``, ``weights [U, B]`` (1 up to and
    including ``</s>``), ``U = max_words + 1``.
    """

    max_digits: int = 6
    test_fraction: float = 0.1
    split_seed: int = 0
    test_size: int = 1000
    src_vocab = 11
    tgt_vocab = len(WORDS)
    bos = 0
    eos = 1

    def __post_init__(self):
        if not isinstance(self.max_digits, int) or not 3 <= self.max_digits <= 6:
            raise ValueError(f"max_digits must be an int in [3, 6], got {self.max_digits!r}.")
        digits, lengths, labels = _number_tables(10**self.max_digits)
        rng = np.random.default_rng(self.split_seed)
        train, test = [np.arange(10)], []
        for length in range(2, self.max_digits + 1):
            numbers = rng.permutation(np.arange(10 ** (length - 1), 10**length))
            held = int(round(self.test_fraction * len(numbers))) if length >= 3 else 0
            train.append(np.sort(numbers[held:]))
            test.append(np.sort(numbers[:held])[: self.test_size // (self.max_digits - 2)])
        counts = np.asarray([len(part) for part in train], np.int32)
        for name, value in (("_digits", digits), ("_lengths", lengths), ("_labels", labels),
                            ("train_numbers", np.concatenate(train)), ("test_numbers", np.concatenate(test)),
                            ("_counts", counts), ("_offsets", np.concatenate([[0], np.cumsum(counts)[:-1]]))):
            object.__setattr__(self, name, jnp.asarray(value))
        object.__setattr__(self, "out_len", labels.shape[1])

    def batch_of(self, numbers: jax.Array) -> dict[str, jax.Array]:
        """The batch of the given ``numbers [B]``."""
        labels = self._labels[numbers].T.astype(jnp.int32)
        ended = jnp.cumsum(labels == self.eos, axis=0) - (labels == self.eos)  # 1 after the end token
        return {"inputs": self._digits[numbers].T.astype(jnp.int32), "lengths": self._lengths[numbers],
                "labels": labels, "weights": (ended == 0).astype(jnp.float32)}

    def sample(self, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
        key_length, key_index = jax.random.split(key)
        group = jax.random.randint(key_length, (batch_size,), 0, self.max_digits)
        within = jnp.floor(jax.random.uniform(key_index, (batch_size,)) * self._counts[group]).astype(jnp.int32)
        return self.batch_of(self.train_numbers[self._offsets[group] + within])

    def test_batch(self) -> dict[str, jax.Array]:
        return self.batch_of(self.test_numbers)

    def decode_words(self, tokens) -> str:
        """Word indices (up to ``</s>``) as text."""
        tokens = [int(t) for t in np.asarray(tokens)]
        return " ".join(WORDS[t] for t in tokens[: tokens.index(self.eos) if self.eos in tokens else None])

    def predict(self, model, params, batch) -> jax.Array:
        """Teacher-forced logits ``[U, B, len(WORDS)]`` of a `rnnlab.models.Seq2Seq`."""
        return model(params, batch["inputs"], batch["labels"], src_lengths=batch["lengths"])

    def loss(self, logits: jax.Array, batch) -> jax.Array:
        """Cross-entropy (nats) per output token, up to and including ``</s>``."""
        return weighted_mean(cross_entropy(logits, batch["labels"]), batch["weights"])

    def accuracy(self, logits: jax.Array, batch) -> jax.Array:
        """Token accuracy under teacher forcing."""
        return weighted_mean(jnp.argmax(logits, -1) == batch["labels"], batch["weights"])

    def decoded_metrics(self, model, params, batch) -> dict[str, jax.Array]:
        """Greedy decoding: ``exact_match`` (every word and the end right) and ``greedy_token_accuracy``."""
        tokens = model.decode(params, batch["inputs"], self.out_len, src_lengths=batch["lengths"])
        return self.scores(tokens, batch)

    @staticmethod
    def scores(tokens: jax.Array, batch) -> dict[str, jax.Array]:
        """``exact_match`` and ``greedy_token_accuracy`` of decoded ``tokens [U, B]``."""
        right = (tokens == batch["labels"]) | (batch["weights"] == 0)
        return {"exact_match": jnp.mean(jnp.all(right, axis=0)),
                "greedy_token_accuracy": weighted_mean(tokens == batch["labels"], batch["weights"])}

    def _position_frequencies(self) -> np.ndarray:
        """``[U, len(WORDS)]``: the training distribution of the word at each output position."""
        labels = np.asarray(self._labels)[np.asarray(self.train_numbers)].astype(int)
        counts = np.asarray(self._counts)
        share = np.repeat(1.0 / (len(counts) * counts), counts)  # a length is drawn uniformly, then a number
        return np.stack([np.bincount(labels[:, u], weights=share, minlength=len(WORDS))
                         for u in range(self.out_len)])

    @property
    def baseline(self) -> float:
        test = jax.device_get(self.test_batch())
        probabilities = self._position_frequencies()
        picked = probabilities[np.arange(self.out_len)[:, None], test["labels"]]
        with np.errstate(divide="ignore"):
            return float(np.sum(-np.log(picked) * test["weights"]) / np.sum(test["weights"]))

    def _majority_scores(self) -> dict[str, float]:
        test = self.test_batch()
        majority = jnp.asarray(np.argmax(self._position_frequencies(), axis=1))
        tokens = jnp.broadcast_to(majority[:, None], test["labels"].shape)
        return {name: float(value) for name, value in self.scores(tokens, test).items()}

    @property
    def baseline_accuracy(self) -> float:
        return self._majority_scores()["greedy_token_accuracy"]

    @property
    def baseline_exact_match(self) -> float:
        return self._majority_scores()["exact_match"]


#: The standard-library modules of the default `CharCorpus`: a fixed list (present in Python 3.9 and later), so the
#: corpus is the same on every machine with the same Python version.
STDLIB_FILES = ("abc.py", "bisect.py", "colorsys.py", "contextlib.py", "copy.py", "fnmatch.py", "functools.py",
                "glob.py", "graphlib.py", "heapq.py", "keyword.py", "numbers.py", "operator.py", "queue.py",
                "sched.py", "shlex.py", "string.py", "textwrap.py")


@dataclasses.dataclass(frozen=True, eq=False)
class CharCorpus:
    r"""Character-level language modelling on Python standard-library source files (every machine has them offline).

    ``files`` are read from ``stdlib`` (default ``sysconfig.get_paths()["stdlib"]``); the last ``test_fraction`` of
    each file is held out, the rest concatenated for training. The vocabulary is every character of the corpus.
    A training batch is ``seq_len + 1`` characters from random places: the model reads characters ``0..T-1`` and
    predicts ``1..T``. The test batch cuts the held-out text into consecutive windows of the same length, each read
    from the initial carry. The baseline is the unigram model: the cross-entropy on the held-out text of the training
    character frequencies (add-one smoothed, so a character unseen in training costs a finite amount).

    **Batch:** ``inputs [T, B, V]`` one-hot, ``labels [T, B]``.
    """

    files: tuple[str, ...] = STDLIB_FILES
    seq_len: int = 128
    test_fraction: float = 0.1
    stdlib: str | None = None

    def __post_init__(self):
        import sysconfig
        from pathlib import Path

        _check_positive("seq_len", self.seq_len)
        folder = Path(self.stdlib or sysconfig.get_paths()["stdlib"])
        texts = [(folder / name).read_text(encoding="utf-8") for name in self.files]
        cuts = [len(text) - int(round(self.test_fraction * len(text))) for text in texts]
        train_text = "".join(text[:cut] for text, cut in zip(texts, cuts))
        test_text = "".join(text[cut:] for text, cut in zip(texts, cuts))
        if len(train_text) <= self.seq_len + 1 or len(test_text) <= self.seq_len + 1:
            raise ValueError(f"the corpus ({len(train_text)} training and {len(test_text)} test characters) is too "
                             f"short for windows of seq_len + 1 = {self.seq_len + 1}.")
        vocabulary = "".join(sorted(set(train_text + test_text)))
        object.__setattr__(self, "vocabulary", vocabulary)
        object.__setattr__(self, "train_tokens", jnp.asarray(self.encode(train_text)))
        object.__setattr__(self, "test_tokens", jnp.asarray(self.encode(test_text)))
        object.__setattr__(self, "digest", __import__("hashlib").sha256("".join(texts).encode()).hexdigest())

    @property
    def input_size(self) -> int:
        return len(self.vocabulary)

    output_size = input_size

    def encode(self, text: str) -> np.ndarray:
        index = {char: i for i, char in enumerate(self.vocabulary)}
        return np.asarray([index[char] for char in text], np.int32)

    def decode(self, tokens) -> str:
        return "".join(self.vocabulary[int(t)] for t in np.asarray(tokens).ravel())

    def _batch(self, windows: jax.Array) -> dict[str, jax.Array]:
        """``windows [T + 1, B]`` tokens -> the batch reading ``0..T-1`` and predicting ``1..T``."""
        return {"inputs": jax.nn.one_hot(windows[:-1], self.input_size), "labels": windows[1:]}

    def sample(self, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
        starts = jax.random.randint(key, (batch_size,), 0, self.train_tokens.shape[0] - self.seq_len)
        return self._batch(self.train_tokens[starts[None, :] + jnp.arange(self.seq_len + 1)[:, None]])

    def test_batch(self) -> dict[str, jax.Array]:
        count = (self.test_tokens.shape[0] - 1) // self.seq_len
        starts = jnp.arange(count) * self.seq_len
        return self._batch(self.test_tokens[starts[None, :] + jnp.arange(self.seq_len + 1)[:, None]])

    @property
    def baseline(self) -> float:
        counts = np.bincount(np.asarray(self.train_tokens), minlength=self.input_size) + 1.0
        labels = np.asarray(self.test_batch()["labels"])
        return float(-np.mean(np.log(counts / counts.sum())[labels]))

    def loss(self, logits: jax.Array, batch) -> jax.Array:
        """Mean cross-entropy per character, in nats (divide by ``log 2`` for bits per character)."""
        return jnp.mean(cross_entropy(logits, batch["labels"]))

    def accuracy(self, logits: jax.Array, batch) -> jax.Array:
        return jnp.mean(jnp.argmax(logits, -1) == batch["labels"])


@dataclasses.dataclass(frozen=True, eq=False)
class Sunspots:
    r"""One-step-ahead forecasting of the yearly sunspot numbers 1700–2008 (309 years; the data set ships inside
    statsmodels, ``statsmodels.datasets.sunspots``).

    The last ``test_years`` are held out. Values are standardised with the training years' mean and standard
    deviation (``mean``, ``std``: multiply a root-mean-square error by ``std`` for sunspot units). A training batch is
    windows of ``seq_len`` years from the training years, the target at each step being the next year. The test
    batch is the whole series as one sequence, scored only where the year predicted is a test year, so the model
    has read all the history before it. The baseline is persistence, ``x̂_{t+1} = x_t``: ``baseline`` is its MSE on
    the test years (standardised units); ``mean_baseline`` that of predicting the training mean.

    **Batch:** ``inputs [T, B, 1]``, ``targets [T, B, 1]``, ``weights [T, B]``.
    """

    seq_len: int = 40
    test_years: int = 60
    input_size = 1
    output_size = 1

    def __post_init__(self):
        from statsmodels.datasets import sunspots

        _check_positive("seq_len", self.seq_len)
        _check_positive("test_years", self.test_years)
        frame = sunspots.load_pandas().data
        values = np.asarray(frame["SUNACTIVITY"], np.float64)
        train_years = len(values) - self.test_years
        if train_years <= self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} and test_years={self.test_years} leave {train_years} "
                             f"training years, not more than one window.")
        mean, std = values[:train_years].mean(), values[:train_years].std()
        object.__setattr__(self, "years", np.asarray(frame["YEAR"], np.int64))
        object.__setattr__(self, "mean", float(mean))
        object.__setattr__(self, "std", float(std))
        object.__setattr__(self, "train_years", train_years)
        object.__setattr__(self, "series", jnp.asarray((values - mean) / std, jnp.float32))

    def sample(self, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
        starts = jax.random.randint(key, (batch_size,), 0, self.train_years - self.seq_len)
        windows = self.series[starts[None, :] + jnp.arange(self.seq_len + 1)[:, None]]
        return {"inputs": windows[:-1, :, None], "targets": windows[1:, :, None],
                "weights": jnp.ones((self.seq_len, batch_size))}

    def test_batch(self) -> dict[str, jax.Array]:
        predicted_year = jnp.arange(1, self.series.shape[0])
        return {"inputs": self.series[:-1, None, None], "targets": self.series[1:, None, None],
                "weights": (predicted_year >= self.train_years).astype(jnp.float32)[:, None]}

    def loss(self, predictions: jax.Array, batch) -> jax.Array:
        """Weighted mean squared error of ``predictions [T, B, 1]`` (standardised units)."""
        return weighted_mean(jnp.square(predictions - batch["targets"])[..., 0], batch["weights"])

    @property
    def baseline(self) -> float:
        series = np.asarray(self.series, np.float64)
        return float(np.mean(np.square(np.diff(series)[self.train_years - 1:])))

    @property
    def mean_baseline(self) -> float:
        return float(np.mean(np.square(np.asarray(self.series, np.float64)[self.train_years:])))
