r"""The four shapes of recurrent models, each a frozen dataclass of configuration with pure ``init`` and call, over
any cell (or `rnnlab.Stack`).

=====================  =======================================================  =============================
shape                  model                                                     example task
=====================  =======================================================  =============================
many-to-one            `ManyToOne`: a readout of the output at the last valid   adding problem, sequential
                       step (``lengths``)                                        digits
many-to-many aligned   `ManyToMany`: a readout at every step; carry in and out   copy task, lag task (TBPTT)
                       so truncated BPTT can chain chunks
one-to-many            `ManyToMany` over one-hot tokens + `generate` (sample,    character language model
                       feed the sample back, temperature)
sequence-to-sequence   `Seq2Seq`: encoder–decoder (Sutskever et al. 2014),       numbers in digits → words
                       teacher forcing, `Seq2Seq.decode` (greedy or sampled)
=====================  =======================================================  =============================

The library never asks which cell it runs. A plain cell is run with `rnnlab.scan`; anything without
``initial_carry`` (a `Stack`) is called as ``cell(params, xs, carry=..., lengths=...) -> (ys, final_carry)``.
Readouts read the cell's per-step *output* ``y_t`` (the hidden state for RNN, LSTM and GRU; the top layer's output
for a Stack).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from rnnlab import fused
from rnnlab.scan import prepare, scan


def dense_init(key: jax.Array, in_size: int, out_size: int, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """A dense layer ``{"w": [in, out] ~ N(0, 1/in), "b": [out] = 0}``."""
    w = jax.random.normal(key, (in_size, out_size), dtype) / jnp.sqrt(jnp.asarray(in_size, dtype))
    return {"w": w, "b": jnp.zeros((out_size,), dtype)}


def embed_tokens(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """``table [V, E]`` rows for integer ``tokens [...]``: ``[..., E]``. In `jax.sharding`'s explicit mode the rows
    are split over devices as ``tokens`` are (a lookup there needs its result's sharding spelled out)."""
    spec = jax.typeof(tokens).sharding.spec
    if any(axis is not None for axis in spec):
        return table.at[tokens].get(out_sharding=PartitionSpec(*spec, None))
    return table[tokens]


def dense(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """``x [..., in] @ w + b -> [..., out]``."""
    return x @ params["w"] + params["b"]


def run_sequence(cell, params, xs: jax.Array, *, carry=None, lengths=None, unroll: int = 1,
                 remat: int | None = None):
    """``xs [T, *batch, I] -> (ys [T, *batch, O], final_carry)`` for a cell or a `Stack` alike. ``unroll`` steps per
    loop iteration (`jax.lax.scan`'s option): on CPU, 4–8 often halves the time of a small model. ``remat``: a chunk
    length dividing ``T``; the backward pass keeps the carry at chunk boundaries and recomputes each chunk
    (`rnnlab.scan`)."""
    if hasattr(cell, "initial_carry"):
        return scan(cell, params, xs, carry=carry, lengths=lengths, unroll=unroll, remat=remat)
    return cell(params, xs, carry=carry, lengths=lengths, unroll=unroll, **({} if remat is None else {"remat": remat}))


@dataclasses.dataclass(frozen=True)
class _KeepingLastOutput:
    """A plain ``cell`` whose carry also holds its latest output ``y``, with an empty output per step.

    Scanned with ``lengths`` (the carry stops at each sequence's last valid step), its final carry holds the output
    `last_valid` would read from ``ys``, but no ``[T, *batch, O]`` output is formed, nor its cotangent: with
    ``remat`` the backward pass keeps ``T / remat + remat`` steps' worth instead of ``2·T`` outputs.
    """

    cell: Any
    output: jax.ShapeDtypeStruct  # one step's ``y [*batch, O]``

    def initial_carry(self, batch_shape=(), dtype: Any = jnp.float32):
        return self.cell.initial_carry(batch_shape, dtype), jnp.zeros(self.output.shape, self.output.dtype)

    def hidden(self, carry) -> jax.Array:
        return self.cell.hidden(carry[0])

    def __call__(self, params, carry, x: jax.Array):
        carry, y = self.cell(params, carry[0], x)
        return (carry, y), y[..., :0]


def _last_output(cell, params, xs: jax.Array, lengths, unroll: int, remat: int) -> jax.Array:
    """``last_valid(run_sequence(cell, params, xs, ...)[0], lengths)`` for a plain cell, without ``ys``."""
    if type(cell) in fused.SUPPORTED:
        # rnnlab's own cells output their hidden state, so the final carry holds the last valid output (and the
        # scan keeps its fused recurrence, the native kernels on a CPU).
        _, final = scan(cell, params, xs, lengths=lengths, unroll=unroll, remat=remat)
        return cell.hidden(final)
    _, carry, _ = prepare(cell, params, xs)  # the default carry, in the dtypes a step returns
    output = jax.eval_shape(lambda: cell(params, carry, xs[0])[1])
    keeping = _KeepingLastOutput(cell, output)
    _, (_, last) = scan(keeping, params, xs, carry=(carry, jnp.zeros(output.shape, output.dtype)), lengths=lengths,
                        unroll=unroll, remat=remat)
    return last


def cell_output_size(cell, params, input_size: int, dtype: Any = jnp.float32) -> int:
    """The feature size of ``ys`` when ``cell`` runs on inputs of ``input_size`` features (traced, not computed)."""
    ys, _ = jax.eval_shape(lambda p: run_sequence(cell, p, jnp.zeros((1, 1, input_size), dtype)), params)
    return ys.shape[-1]


def _init_with_readout(cell, key, input_size, output_size, dtype) -> dict:
    key_cell, key_out = jax.random.split(key)
    cell_params = cell.init(key_cell, input_size, dtype)
    hidden = cell_output_size(cell, cell_params, input_size, dtype)
    return {"cell": cell_params, "readout": dense_init(key_out, hidden, output_size, dtype)}


def last_valid(ys: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """``ys [T, *batch, F]`` at each sequence's last valid step (``lengths - 1``; ``T - 1`` without lengths)."""
    if lengths is None:
        return ys[-1]
    index = (jnp.asarray(lengths) - 1)[None, ..., None]
    return jnp.take_along_axis(ys, jnp.broadcast_to(index, (1,) + ys.shape[1:]), axis=0)[0]


@dataclasses.dataclass(frozen=True)
class ManyToOne:
    """Many-to-one: ``xs [T, *batch, I] -> [*batch, output_size]``, a dense readout of ``y`` at the last valid step.

    **Parameters:** ``{"cell": ..., "readout": {"w": [H, O], "b": [O]}}``. ``unroll``, ``remat``: see
    `run_sequence`. With ``remat`` and a plain cell the output at the last valid step is taken from the final carry
    (rnnlab's cells, whose output is their hidden state) or carried along the scan (any other cell) instead of read
    from all the outputs, so the gradient's memory grows as ``T / remat + remat`` (as ``√T`` with ``remat ≈ √T``,
    `rnnlab.remat_near_sqrt`) besides the inputs themselves; a `Stack` passes every layer's outputs to the next.
    """

    cell: Any
    output_size: int
    unroll: int = 1
    remat: int | None = None

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> dict:
        return _init_with_readout(self.cell, key, input_size, self.output_size, dtype)

    def __call__(self, params, xs: jax.Array, *, lengths: jax.Array | None = None) -> jax.Array:
        if self.remat is not None and hasattr(self.cell, "initial_carry"):
            return dense(params["readout"], _last_output(self.cell, params["cell"], jnp.asarray(xs), lengths,
                                                         self.unroll, self.remat))
        ys, _ = run_sequence(self.cell, params["cell"], xs, lengths=lengths, unroll=self.unroll, remat=self.remat)
        return dense(params["readout"], last_valid(ys, lengths))


@dataclasses.dataclass(frozen=True)
class ManyToMany:
    """Many-to-many, aligned: a dense readout at every step, ``xs [T, *batch, I] -> outputs [T, *batch, O]``.

    The call takes and returns the carry, so truncated BPTT can feed one chunk's final carry to the next; with
    ``carry=None`` the run starts from the cell's initial carry.

    **Parameters:** ``{"cell": ..., "readout": {"w": [H, O], "b": [O]}}``. ``unroll``, ``remat``: see
    `run_sequence` (the outputs at every step are ``T`` of them whatever ``remat``).
    """

    cell: Any
    output_size: int
    unroll: int = 1
    remat: int | None = None

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> dict:
        return _init_with_readout(self.cell, key, input_size, self.output_size, dtype)

    def __call__(self, params, xs: jax.Array, *, carry=None, lengths: jax.Array | None = None):
        ys, final_carry = run_sequence(self.cell, params["cell"], xs, carry=carry, lengths=lengths,
                                       unroll=self.unroll, remat=self.remat)
        return dense(params["readout"], ys), final_carry


def sample_logits(key: jax.Array, logits: jax.Array, temperature: float) -> jax.Array:
    """A token per row of ``logits [..., V]``: ``argmax`` at ``temperature == 0`` (greedy), else a draw from
    ``softmax(logits / temperature)``."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(key, logits / temperature, axis=-1)


def _one_step(cell, params, carry, x: jax.Array):
    """One step of a cell or a Stack: ``x [*batch, I] -> (carry, y [*batch, O])``."""
    ys, carry = run_sequence(cell, params, x[None], carry=carry)
    return carry, ys[0]


def _autoregress(cell, cell_params, readout, embed, carry, first_logits, key, steps: int, temperature: float):
    """Sample ``steps`` tokens, feeding each back (through ``embed``) as the next input; ``first_logits`` gives the
    first. Returns ``(tokens [steps, *batch], logits [steps, *batch, V])``."""

    def body(state, step_key):
        carry, logits = state
        token = sample_logits(step_key, logits, temperature)
        carry, y = _one_step(cell, cell_params, carry, embed(token))
        return (carry, dense(readout, y)), (token, logits)

    _, (tokens, logits) = jax.lax.scan(body, (carry, first_logits), jax.random.split(key, steps))
    return tokens, logits


def generate(model: ManyToMany, params, key: jax.Array, prompt: jax.Array, steps: int, *, vocab_size: int,
             temperature: float = 1.0) -> jax.Array:
    """One-to-many generation from a `ManyToMany` trained on one-hot tokens (a character language model).

    The ``prompt [P, *batch]`` (integer tokens, P ≥ 1) is read; then each of ``steps`` tokens is drawn from the
    readout at ``temperature`` (0 = greedy) and fed back as the next input. **Returns:** ``[steps, *batch]`` tokens.
    """
    def embed(tokens):
        return jax.nn.one_hot(tokens, vocab_size, dtype=params["readout"]["w"].dtype)

    outputs, carry = model(params, embed(prompt))
    tokens, _ = _autoregress(model.cell, params["cell"], params["readout"], embed, carry, outputs[-1], key, steps,
                             temperature)
    return tokens


@dataclasses.dataclass(frozen=True)
class Seq2Seq:
    r"""Encoder–decoder (Sutskever, Vinyals & Le 2014; Cho et al. 2014) for input and output of different lengths.

    The encoder reads embedded source tokens; its final carry (at each sequence's last valid step) is the decoder's
    initial carry, so the two cells must have the same carry structure. The decoder reads embedded target tokens
    shifted right behind ``bos`` (teacher forcing) and a dense readout gives the next-token logits.

    **Parameters:** ``{"src_embed": [Vs, E], "tgt_embed": [Vt, E], "encoder", "decoder", "readout"}``.
    """

    encoder: Any
    decoder: Any
    src_vocab: int
    tgt_vocab: int
    embed_size: int
    bos: int = 0

    def init(self, key: jax.Array, dtype: Any = jnp.float32) -> dict:
        k_src, k_tgt, k_enc, k_dec, k_out = jax.random.split(key, 5)
        decoder = self.decoder.init(k_dec, self.embed_size, dtype)
        hidden = cell_output_size(self.decoder, decoder, self.embed_size, dtype)
        return {
            "src_embed": jax.random.normal(k_src, (self.src_vocab, self.embed_size), dtype),
            "tgt_embed": jax.random.normal(k_tgt, (self.tgt_vocab, self.embed_size), dtype),
            "encoder": self.encoder.init(k_enc, self.embed_size, dtype),
            "decoder": decoder,
            "readout": dense_init(k_out, hidden, self.tgt_vocab, dtype),
        }

    def encode(self, params, src: jax.Array, src_lengths: jax.Array | None = None):
        """``src [S, *batch]`` tokens -> the encoder's final carry."""
        _, carry = run_sequence(self.encoder, params["encoder"], embed_tokens(params["src_embed"], src),
                                lengths=src_lengths)
        return carry

    def __call__(self, params, src: jax.Array, tgt: jax.Array, *, src_lengths: jax.Array | None = None) -> jax.Array:
        """Teacher forcing: ``src [S, *batch]``, ``tgt [U, *batch]`` tokens -> logits ``[U, *batch, Vt]`` for
        ``tgt`` (step ``u`` sees ``bos, tgt[0], ..., tgt[u-1]``)."""
        carry = self.encode(params, src, src_lengths)
        shifted = jnp.concatenate([jnp.full_like(tgt[:1], self.bos), tgt[:-1]], axis=0)  # split as tgt is
        ys, _ = run_sequence(self.decoder, params["decoder"], embed_tokens(params["tgt_embed"], shifted), carry=carry)
        return dense(params["readout"], ys)

    def decode(self, params, src: jax.Array, steps: int, *, src_lengths: jax.Array | None = None,
               key: jax.Array | None = None, temperature: float = 0.0) -> jax.Array:
        """Greedy (``temperature=0``) or sampled decoding of ``steps`` tokens: ``[steps, *batch]``."""
        carry = self.encode(params, src, src_lengths)
        batch_shape = src.shape[1:]
        carry, y = _one_step(self.decoder, params["decoder"], carry,
                             embed_tokens(params["tgt_embed"], jnp.full(batch_shape, self.bos, jnp.int32)))
        key = jax.random.key(0) if key is None else key
        tokens, _ = _autoregress(self.decoder, params["decoder"], params["readout"],
                                 lambda token: embed_tokens(params["tgt_embed"], token), carry,
                                 dense(params["readout"], y), key, steps, temperature)
        return tokens


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-element cross-entropy in nats: ``logits [..., V]``, integer ``labels [...]`` -> ``[...]``."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
    """``Σ w·v / Σ w`` (plain mean without weights); a chunk with no weight gives 0, not nan."""
    if weights is None:
        return jnp.mean(values)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)
