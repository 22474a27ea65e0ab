"""The recurrences of the plain RNN, the LSTM and the GRU to hidden 128 (the plain RNN to 256) on a GPU as Pallas
(Triton) programs, one program or a team of them per 16 batch rows.

On a GPU, XLA runs a `lax.scan` as a loop whose every iteration launches its kernels and waits for the loop
condition: about 4 µs a step for the tanh RNN at batch 16, hidden 128 on an H200, whatever the step's work (see
benchmarks/README.md, "On a GPU"). Here one program runs all ``T`` steps of its 16 rows, with ``W_h`` loaded once
and held in registers (at most `HELD_FLOATS` float32, 64 KB: the plain RNN to hidden 128, the LSTM and GRU to
hidden 64), so a step costs the loads of its inputs, one small matmul per gate, the gate maths and the stores
(the loads issued a step ahead, `read_ahead`).

A larger ``W_h`` (the LSTM's and GRU's at hidden 128, 256 and 192 KB; the plain RNN's at 256) is shared out over a
team of programs (`team_size`, `_Team`), as cuDNN's persistent kernels share it over multiprocessors: the team's
programs run side by side on the same 16 rows, each holding ``W_h``'s columns for a quarter of the hidden units
(its rows for them, backward) and computing those units of every gate. Every step each program stores its units
of ``h`` (backward: of the gates' cotangent) in the output it writes anyway, then reads that step's whole row back
once the others have stored theirs: the output starts as a NaN of a bit pattern no arithmetic makes (`SENTINEL`),
and a program reads again (past its L1 cache) until none of the row is left, so data and signal travel together,
with no counter or barrier. That needs every program of a team running at once: `team_size` keeps a batch's programs
within the GPU's multiprocessors. On an H100 at batch 16, T = 1000, hidden 128 (benchmarks/README.md, "Run 9") the teams
run the LSTM and GRU 1.6-1.7x faster than XLA's loops (the H200 probe's four programs meeting at an atomic counter every
step ran the LSTM's forward loop 10 % faster than XLA's), and the plain RNN at hidden 256, batch 64, 1.25-1.3x. Pallas's
interpreter runs the programs one after another, so there (`interpret`, the tests without a GPU) one program does a
team's work, unless a test asks for a team (`_run`); `tests/test_gpu.py` holds the teams to XLA's loops on a GPU.

Each forward kernel computes what its primitive in `rnnlab.native` does (``hs``, and the LSTM's ``cs`` and gates,
the GRU's gates and ``a_n``); each backward kernel is the transpose of the primitive's tangent, run from the last
step to the first with ``λ`` the cotangent of the carry: for the plain RNN, ``g_z_t = (g_hs_t + λ) ⊙ φ'(h_t)`` and
``λ ← g_z_t W_hᵀ``, returning ``g_z [T, B, H]`` (the cotangent of ``px``) and ``λ`` at the first step (``h0``'s);
the LSTM's and GRU's likewise per gate block, with the cell state's cotangent carried beside ``λ`` for the LSTM.
``W_h``'s gradient, ``Σ_t h_{t-1}ᵀ g_z_t``, is one XLA matmul after the kernel. ``reverse`` runs the recurrence
from ``t = T - 1`` down, as `lax.scan` does. With ``valid [T, B]`` (padded sequences: the primitives' masked
twins) a row at an invalid step keeps its carry, its pre-activation cotangent is zero and the carry's cotangent
(its output's added) passes to the step before unchanged.

Triton slices no loaded value, so the gate blocks are loaded and stored one by one (``W_h``'s blocks too), each
gate has its own matmul, and the gate maths is written here block by block rather than taken from `rnnlab.fused`'s
steps, which split and concatenate whole rows; the tests hold the kernels to those steps' float64 results.

The kernels' matmuls follow `jax.default_matmul_precision` as XLA's do (`jnp.dot` reads it while tracing): TF32
allowed on a GPU by default, float32 under ``"highest"``.

Pallas's Triton backend is deprecated from jax 0.11 (a DeprecationWarning at each lowering, silenced here: a user
cannot act on it). Where a JAX has none, `applies` is False and the XLA loops run; porting these kernels to
Mosaic GPU is what keeps them.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

#: Rows of the batch per program: the smallest matmul a Triton dot takes.
ROWS = 16
#: Hidden sizes the kernels take (powers of two: Triton's blocks are).
HIDDEN_SIZES = (16, 32, 64, 128, 256)
#: Floats of ``W_h [H, G·H]`` one program holds in registers: the plain RNN's at hidden 128 (64 KB), which held
#: was 1.4x faster than read from L2 every step in the H200 probe. A larger ``W_h`` is shared out over a team of
#: programs (`team_size`).
HELD_FLOATS = 128 * 128
#: The most programs in a team (`team_size`): the LSTM and GRU at hidden 128 and the plain RNN at 256 take 4.
MAX_TEAM = 4
#: The fewest units of each gate a program of a team computes: the narrowest matmul a Triton dot takes.
MIN_UNITS = 16
#: The bits (as int32) of the NaN a team's exchange starts as (`_Team.exchange`): a negative quiet NaN whose payload
#: no arithmetic makes (NVIDIA's own NaN is 0x7FFFFFFF).
SENTINEL = -0x3F2153  # 0xFFC0DEAD
#: Reads of one step's exchange after which a program of a team stops waiting (`_Team.exchange`): some 2²⁰ reads of
#: 0.5-1 µs each, a second or so, where a step's wait is a few reads.
PATIENCE = 2**20
#: Programs that may run at once where no GPU says how many streaming multiprocessors it has (lowered for CUDA
#: without one): a team's programs must all run at once (`team_size`).
FEWEST_PROCESSORS = 16
#: Warps per program: with each step's inputs read ahead, 4 took 3-10 % less time than 8 in each of five cases on an
#: H100 (LSTM and GRU at hidden 64, the plain RNN at 64 and 128; 16 warps 11-30 % more; benchmarks/README.md, "Run
#: 7"). Without reading ahead, 8 had taken 7-19 % less than 4 in the H200 probe of the plain RNN.
NUM_WARPS = 4
#: Gate blocks of ``W_h`` per cell: the plain RNN (named by its activation), the GRU and the LSTM.
GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def applies(w_h_shape, sequence_shape, dtypes, activation: str | None = None) -> bool:
    """Whether the kernels run this recurrence: ``W_h [H, G·H]`` (one set of weights; ``G`` 1 for the plain RNN,
    whose built-in ``activation`` is given, 3 for the GRU and 4 for the LSTM, ``activation=None``) with ``H`` in
    `HIDDEN_SIZES` that a program or a team of them holds (`team_size`), a sequence ``[T, B, ...]`` with rows
    (``B > 0``) whose widest array ``[T, B, G·H]`` has fewer than 2³¹ elements once padded (Triton's offsets are
    32-bit), float32 throughout, and a Pallas that lowers to Triton."""
    from rnnlab.fused import _RNN_DERIVATIVES

    if len(w_h_shape) != 2 or w_h_shape[0] not in HIDDEN_SIZES:
        return False
    (hidden, width), (steps, batch) = w_h_shape, sequence_shape[:2]
    gates = GATES["rnn"] if activation is not None else width // hidden
    return (width == gates * hidden and gates in GATES.values()
            and (activation in _RNN_DERIVATIVES if gates == 1 else activation is None)
            and 0 < steps * _padded_rows(batch) * width < 2**31 and all(dtype == jnp.float32 for dtype in dtypes)
            and team_size(w_h_shape, batch) is not None and _compiler_params() is not None)


def team_size(w_h_shape, batch: int) -> int | None:
    """Programs per `ROWS` rows for ``W_h [H, G·H]`` and ``batch`` rows: the fewest (a power of two, at most
    `MAX_TEAM`) whose shares of ``W_h``'s columns, ``[H, G·H / size]``, each fit in `HELD_FLOATS`, each program
    computing at least `MIN_UNITS` units; None where there are none, or where a team's programs over the whole
    batch could outnumber the GPU's streaming multiprocessors (`FEWEST_PROCESSORS` where no GPU is visible). Every
    program of a team waits for the others every step, so they must all run at once. Nothing guarantees that short
    of a cooperative launch, which Pallas does not make; with at most one program per multiprocessor, and each
    team's programs consecutive in launch order, they do in practice, unless other work holds multiprocessors for
    long (another process's kernels under MPS, for one): there `_Team.exchange` stops waiting after `PATIENCE`
    reads and the results hold NaNs."""
    hidden, width = w_h_shape
    size = 1
    while hidden * width > size * HELD_FLOATS:
        size *= 2
    if size > MAX_TEAM or hidden // size < MIN_UNITS:
        return None
    return size if size == 1 or _padded_rows(batch) // ROWS * size <= _processors() else None


@functools.cache
def _processors() -> int:
    """The streaming multiprocessors of this process's smallest GPU, or `FEWEST_PROCESSORS` where none says."""
    try:
        counts = [getattr(device, "core_count", 0) for device in jax.local_devices(backend="gpu")]
    except RuntimeError:  # no GPU backend
        counts = []
    return min([count for count in counts if count > 0], default=FEWEST_PROCESSORS)


@functools.cache
def _compiler_params():
    try:
        from jax.experimental.pallas import triton as pallas_triton
    except ImportError:
        return None
    params = getattr(pallas_triton, "CompilerParams", None) or getattr(pallas_triton, "TritonCompilerParams", None)
    return None if params is None else params(num_warps=NUM_WARPS, num_stages=1)


def read_ahead() -> bool:
    """Whether the kernels read each step's inputs one step ahead (issued before the step's matmuls, used after
    them, so the loads' latency overlaps the step's work): unless ``$RNNLAB_PALLAS_AHEAD`` is ``0``; read while
    tracing. On an H100 (benchmarks/README.md, "Run 7") reading ahead was faster in each of the 11 cases timed
    beside the kernels without it: 1.08-1.10x for the plain RNN at hidden 128, 1.05-1.45x at hidden 64 (LSTM
    1.19-1.30x, GRU 1.09-1.45x, tanh RNN 1.05-1.30x, padded sequences included)."""
    return os.environ.get("RNNLAB_PALLAS_AHEAD", "1") != "0"


def _time(step, steps: int, reverse: bool):
    """The time index of loop iteration ``step``."""
    return steps - 1 - step if reverse else step


def _read_time(step, steps: int, reverse: bool):
    """The time index whose inputs loop iteration ``step`` reads, clamped: reading ahead, the read one past the last
    step is never used."""
    return _time(jnp.minimum(step, steps - 1), steps, reverse)


def _mask_at(valid_ref: list, t) -> tuple:
    """``(valid[t] [ROWS],)`` with a padding mask, else ``()``."""
    return tuple(valid[t, :] for valid in valid_ref)


def _loop(steps: int, read, advance, state, ahead: bool):
    """``state`` after ``advance(s, state, *read(s))`` for ``s`` in ``0..steps-1``; ``ahead``: each step's
    ``read(s + 1)`` issued before its ``advance`` (``read`` clamps ``s``: the read past the last step is unused)."""
    if not ahead:
        return jax.lax.fori_loop(0, steps, lambda s, state: advance(s, state, *read(s)), state)

    def step(s, carry):
        state, inputs = carry
        upcoming = read(s + 1)
        return advance(s, state, *inputs), upcoming

    return jax.lax.fori_loop(0, steps, step, (state, read(0)))[0]


class _Team:
    """The hidden units one program of a team computes: the programs along the grid's first axis share their 16
    rows (a team's programs are consecutive in launch order, so whole teams start together), program ``m`` of
    ``size`` computing units ``m·U`` to ``(m + 1)·U - 1`` (``U = H / size``) of each gate, and the team exchanging
    its units every step through an output (`exchange`). With one program (``size`` 1) a program computes every
    unit and exchanges nothing."""

    def __init__(self, size: int, hidden: int):
        from jax.experimental import pallas as pl

        self.size, self.hidden, self.units = size, hidden, hidden // size
        self.first = pl.program_id(0) * self.units if size > 1 else 0  # the first unit it computes

    def own(self, block: int = 0):
        """The columns of gate block ``block`` this program computes, as a slice of a ``[..., G·H]`` axis."""
        from jax.experimental import pallas as pl

        return pl.ds(block * self.hidden + self.first, self.units)

    def whole(self, block: int = 0):
        """Gate block ``block``, every unit."""
        from jax.experimental import pallas as pl

        return pl.ds(block * self.hidden, self.hidden)

    def columns(self, ref, gates: int) -> list:
        """``W_h``'s columns of this program's units, ``[H, U]`` per gate block: a forward step's ``h W_h``."""
        return [ref[:, self.own(k)] for k in range(gates)]

    def rows(self, ref, gates: int) -> list:
        """``W_h``'s rows of this program's units, ``[U, H]`` per gate block: a backward step's ``g W_hᵀ``."""
        return [ref[self.own(0), self.whole(k)] for k in range(gates)]

    def load(self, ref, t=None, gates: int = 1) -> list:
        """``ref[t]``'s columns of this program's units (``ref``'s, of a 1-D ``ref``, without ``t``), per gate
        block."""
        index = () if t is None else (t, slice(None))
        return [ref[(*index, self.own(k))] for k in range(gates)]

    def store(self, ref, t, blocks: list):
        """``ref[t]``'s columns of this program's units from ``blocks``, one per gate block."""
        for k, block in enumerate(blocks):
            ref[t, :, self.own(k)] = block

    def waiting(self) -> tuple:
        """The state of waiting a loop carries (`exchange`): none for a single program."""
        return () if self.size == 1 else (jnp.bool_(True),)

    def exchange(self, ref, t, blocks: list, waiting: tuple, also: tuple = ()):
        """``(whole, waiting)``: ``blocks`` (this program's units, one per gate block) stored in ``ref[t]``, and every
        unit of ``ref[t]``, one ``[ROWS, H]`` per gate block, once the whole team has stored its units there (with
        one program, ``blocks``). ``also``: the step's other outputs, ``(ref, blocks)`` pairs, stored after
        ``blocks`` and before the wait, so that the units the team waits for leave first (GPU run 10, H100, batch
        16, T = 1000, hidden 128: the LSTM's and GRU's forward + backward 5 % faster than storing them last).

        ``ref`` starts as `SENTINEL` (`_call`); the program reads the row again, past its L1 cache (``volatile``),
        until no element is. Every element is stored once, by one thread, whole (32 bits), and checked on its own,
        so a read sees each either as the sentinel or as its value, whatever the order in which the stores reach
        the L2 cache: the stores are plain and the PTX memory model promises nothing about when another program
        sees them, which can delay a step but not change a value. A team whose programs were not all running would
        wait for ever: after `PATIENCE` reads of one step the program stops waiting (``waiting`` False) for this
        and every later step, and computes on with the sentinel, a NaN, which every result it touches keeps."""
        self.store(ref, t, blocks)
        for other, other_blocks in also:
            self.store(other, t, other_blocks)
        if self.size == 1:
            return blocks, waiting
        from jax.experimental.pallas import triton as pallas_triton

        def read():
            whole = [pallas_triton.load(ref.at[t, :, self.whole(k)], volatile=True) for k in range(len(blocks))]
            marked = [jnp.max(jnp.where(jax.lax.bitcast_convert_type(b, jnp.int32) == SENTINEL, 1, 0))
                      for b in whole]
            return whole, functools.reduce(jnp.maximum, marked) > 0

        def again(state):
            _, incomplete, reads = state
            return incomplete & (reads < PATIENCE) & waiting[0]

        whole, incomplete, _ = jax.lax.while_loop(again, lambda state: (*read(), state[2] + 1), (*read(), 1))
        return whole, (waiting[0] & ~incomplete,)

    def start(self, h0_ref) -> tuple:
        """A forward loop's hidden state at its start: ``(h, h_own)``, the whole ``h0`` (the next step's matmul) and
        this program's units of it (what a masked row keeps); with one program they are one (``h_own`` None)."""
        return h0_ref[...], (None if self.size == 1 else h0_ref[:, self.own()])

    @staticmethod
    def mine(hidden: tuple):
        """This program's units of a forward loop's hidden state ``(h, h_own)``."""
        h, h_own = hidden
        return h if h_own is None else h_own

    def advance(self, hs_ref, t, h_new, waiting: tuple, also: tuple = ()) -> tuple:
        """``((h, h_own), waiting)`` after a forward step: ``h_new`` (this program's units) stored in ``hs_ref[t]``,
        then the step's other outputs ``also`` (`exchange`), and the whole of ``h`` once the team has stored
        theirs."""
        (h,), waiting = self.exchange(hs_ref, t, [h_new], waiting, also)
        return (h, None if self.size == 1 else h_new), waiting


def _times_w(h, w_blocks: list) -> list:
    """``h W_h``, block by block."""
    return [jnp.dot(h, w, preferred_element_type=jnp.float32) for w in w_blocks]


def _times_w_transposed(g_blocks: list, w_blocks: list):
    """``g W_hᵀ`` from ``g``'s blocks: each block's hidden axis contracted with its ``W_h`` block's output axis."""
    terms = [jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
             for g, w in zip(g_blocks, w_blocks)]
    return functools.reduce(jnp.add, terms)


def _keep(valid_t):
    """The rows of a step that run it, ``[ROWS, 1]``, or None without a mask."""
    return valid_t[0][:, None] > 0 if valid_t else None


def _kept(keep, new, old):
    return new if keep is None else jnp.where(keep, new, old)


def _state_before(s, steps: int, back: bool, ref, columns, first):
    """In a loop running backward through time, the state entering iteration ``s``'s step: ``ref`` at the time of
    iteration ``s + 1`` (its ``columns``), or ``first`` (``h0``, ``c0``) at the last iteration."""
    return jnp.where(s >= steps - 1, first, ref[_read_time(s + 1, steps, back), :, columns])


def _activation(name: str):
    """The plain RNN's φ in a kernel: `rnnlab.cells`'s, but ReLU as a `jnp.where` that keeps a NaN, as XLA's
    ReLU does (Pallas lowers ``max`` to Triton's ``maxnumf``, which would turn a NaN into 0)."""
    from rnnlab.cells import _ACTIVATIONS

    return (lambda z: jnp.where(z < 0, 0.0, z)) if name == "relu" else _ACTIVATIONS[name]


# --- the plain RNN: h_t = φ(px_t + h_{t-1} W_h) --------------------------------------------------------------------


def _rnn_forward_kernel(w_ref, h0_ref, px_ref, *refs, steps, reverse, activation, ahead, members):
    *valid_ref, hs_ref = refs  # with a padding mask, ``valid [T, B]`` (1.0 or 0.0) before the output
    phi = _activation(activation)
    team = _Team(members, h0_ref.shape[-1])
    w_h = team.columns(w_ref, 1)  # loaded once: held in registers for all steps

    def read(s):
        t = _read_time(s, steps, reverse)
        return (*team.load(px_ref, t), *_mask_at(valid_ref, t))

    def advance(s, state, px_t, *valid_t):
        hidden, waiting = state
        new = _kept(_keep(valid_t), phi(px_t + _times_w(hidden[0], w_h)[0]), team.mine(hidden))
        return team.advance(hs_ref, _time(s, steps, reverse), new, waiting)

    _loop(steps, read, advance, (team.start(h0_ref), team.waiting()), ahead)


def _rnn_backward_kernel(w_ref, hs_ref, g_hs_ref, g_h_ref, *refs, steps, reverse, activation, ahead, members):
    from rnnlab.fused import _RNN_DERIVATIVES

    *valid_ref, g_z_ref, g_h0_ref = refs
    derivative = _RNN_DERIVATIVES[activation]
    team = _Team(members, g_h_ref.shape[-1])
    w_h = team.rows(w_ref, 1)
    back = not reverse  # the recurrence ran forward in time for `reverse=False`: its transpose runs the other way

    def read(s):
        t = _read_time(s, steps, back)
        return (*team.load(hs_ref, t), *team.load(g_hs_ref, t), *_mask_at(valid_ref, t))

    def advance(s, state, h_t, g_h_t, *valid_t):
        g_carry, waiting = state
        keep = _keep(valid_t)
        g = g_h_t + g_carry
        g_z = _kept(keep, g if derivative is None else g * derivative(h_t), 0.0)
        g_z_all, waiting = team.exchange(g_z_ref, _time(s, steps, back), [g_z], waiting)
        return _kept(keep, _times_w_transposed(g_z_all, w_h), g), waiting

    g_h0_ref[:, team.own()] = _loop(steps, read, advance, (g_h_ref[:, team.own()], team.waiting()), ahead)[0]


# --- the LSTM (gates i, f, g, o) ------------------------------------------------------------------------------------


def _lstm_forward_kernel(w_ref, h0_ref, c0_ref, px_ref, *refs, steps, reverse, ahead, members):
    *valid_ref, hs_ref, cs_ref, gates_ref = refs
    team = _Team(members, h0_ref.shape[-1])
    w_h = team.columns(w_ref, 4)

    def read(s):
        t = _read_time(s, steps, reverse)
        return (*team.load(px_ref, t, 4), *_mask_at(valid_ref, t))

    def advance(s, state, px_i, px_f, px_g, px_o, *valid_t):
        hidden, c, waiting = state
        z_i, z_f, z_g, z_o = (px + hw for px, hw in zip((px_i, px_f, px_g, px_o), _times_w(hidden[0], w_h)))
        i, f, g, o = jax.nn.sigmoid(z_i), jax.nn.sigmoid(z_f), jnp.tanh(z_g), jax.nn.sigmoid(z_o)
        keep = _keep(valid_t)
        c_new = _kept(keep, f * c + i * g, c)
        h_new = _kept(keep, o * jnp.tanh(c_new), team.mine(hidden))
        t = _time(s, steps, reverse)
        # The gates of an invalid step are stored too, as the reference saves them.
        hidden, waiting = team.advance(hs_ref, t, h_new, waiting, ((cs_ref, [c_new]), (gates_ref, [i, f, g, o])))
        return hidden, c_new, waiting

    _loop(steps, read, advance, (team.start(h0_ref), c0_ref[:, team.own()], team.waiting()), ahead)


def _lstm_backward_kernel(w_ref, gates_ref, cs_ref, c0_ref, g_hs_ref, g_h_ref, g_c_ref, *refs, steps, reverse,
                          ahead, members):
    *valid_ref, g_z_ref, g_h0_ref, g_c0_ref = refs
    team = _Team(members, c0_ref.shape[-1])
    w_h = team.rows(w_ref, 4)
    c0 = c0_ref[:, team.own()]
    back = not reverse

    def read(s):  # the step's gates, the cell state entering it, its output's cotangent
        t = _read_time(s, steps, back)
        return (*team.load(gates_ref, t, 4), _state_before(s, steps, back, cs_ref, team.own(), c0),
                *team.load(g_hs_ref, t), *_mask_at(valid_ref, t))

    def advance(s, state, i, f, g, o, c_prev, g_hs_t, *valid_t):
        g_h, g_c, c, waiting = state  # the carry's cotangents, and the cell state this step made
        keep = _keep(valid_t)
        g_h = g_h + g_hs_t
        tanh_c = jnp.tanh(c)
        g_c_total = g_c + g_h * o * (1 - tanh_c * tanh_c)
        g_z = [g_c_total * g * i * (1 - i), g_c_total * c_prev * f * (1 - f), g_c_total * i * (1 - g * g),
               g_h * tanh_c * o * (1 - o)]
        g_z = [_kept(keep, block, 0.0) for block in g_z]
        g_z_all, waiting = team.exchange(g_z_ref, _time(s, steps, back), g_z, waiting)
        return (_kept(keep, _times_w_transposed(g_z_all, w_h), g_h), _kept(keep, g_c_total * f, g_c), c_prev,
                waiting)

    first = cs_ref[_time(0, steps, back), :, team.own()]
    start = (g_h_ref[:, team.own()], g_c_ref[:, team.own()], first, team.waiting())
    g_h0_ref[:, team.own()], g_c0_ref[:, team.own()], *_ = _loop(steps, read, advance, start, ahead)


# --- the GRU (cuDNN's convention: gates r, z, n; a = h W_h + b_h) ---------------------------------------------------


def _gru_forward_kernel(w_ref, b_ref, h0_ref, px_ref, *refs, steps, reverse, ahead, members):
    *valid_ref, hs_ref, gates_ref, a_n_ref = refs
    team = _Team(members, h0_ref.shape[-1])
    w_h = team.columns(w_ref, 3)
    b_h = [b[None, :] for b in team.load(b_ref, gates=3)]

    def read(s):
        t = _read_time(s, steps, reverse)
        return (*team.load(px_ref, t, 3), *_mask_at(valid_ref, t))

    def advance(s, state, x_r, x_z, x_n, *valid_t):
        hidden, waiting = state
        a_r, a_z, a_n = (hw + b for hw, b in zip(_times_w(hidden[0], w_h), b_h))
        r, z = jax.nn.sigmoid(x_r + a_r), jax.nn.sigmoid(x_z + a_z)
        n = jnp.tanh(x_n + r * a_n)
        h_prev = team.mine(hidden)
        h_new = _kept(_keep(valid_t), (1.0 - z) * n + z * h_prev, h_prev)
        t = _time(s, steps, reverse)
        return team.advance(hs_ref, t, h_new, waiting, ((gates_ref, [r, z, n]), (a_n_ref, [a_n])))

    _loop(steps, read, advance, (team.start(h0_ref), team.waiting()), ahead)


def _gru_backward_kernel(w_ref, gates_ref, a_n_ref, hs_ref, h0_ref, g_hs_ref, g_h_ref, *refs, steps, reverse, ahead,
                         members):
    *valid_ref, g_u_ref, g_h0_ref = refs
    team = _Team(members, h0_ref.shape[-1])
    w_h = team.rows(w_ref, 3)
    h0 = h0_ref[:, team.own()]
    back = not reverse

    def read(s):  # the step's gates and a_n, the state entering it, its output's cotangent; a team: every unit's r
        t = _read_time(s, steps, back)
        r_all = () if team.size == 1 else (gates_ref[t, :, team.whole(0)],)
        return (*team.load(gates_ref, t, 3), *team.load(a_n_ref, t),
                _state_before(s, steps, back, hs_ref, team.own(), h0), *team.load(g_hs_ref, t), *r_all,
                *_mask_at(valid_ref, t))

    def advance(s, state, r, z, n, a_n, h_prev, g_hs_t, *rest):
        # The transpose of `fused._gru_tangent_step`: the cotangent of u per block is g ⊙ into_h, and the carry's
        # is (g ⊙ into_h ⊙ [1, 1, r]) W_hᵀ + z ⊙ g.
        r_all, *valid_t = rest if team.size > 1 else (r, *rest)
        g_carry, waiting = state
        keep = _keep(valid_t)
        g = g_carry + g_hs_t
        new_coeff = (1 - z) * (1 - n * n)
        g_u = [g * new_coeff * r * (1 - r) * a_n, g * (h_prev - n) * z * (1 - z), g * new_coeff]
        g_u = [_kept(keep, block, 0.0) for block in g_u]
        (g_u_r, g_u_z, g_u_n), waiting = team.exchange(g_u_ref, _time(s, steps, back), g_u, waiting)
        recurrent = _times_w_transposed([g_u_r, g_u_z, g_u_n * r_all], w_h)
        return _kept(keep, recurrent + z * g, g), waiting

    g_h0_ref[:, team.own()] = _loop(steps, read, advance, (g_h_ref[:, team.own()], team.waiting()), ahead)[0]


# --- calls ------------------------------------------------------------------------------------------------------------


def _padded_rows(batch: int) -> int:
    return -(-batch // ROWS) * ROWS


def _call(kernel, args, out_shapes, batch_axes, out_batch_axes, interpret, members: int, exchange, name: str):
    """``kernel`` over programs of `ROWS` rows, ``members`` programs per `ROWS` rows (`_Team`; the grid's first
    axis, so that a team's programs are consecutive in launch order): the batch padded to a multiple of `ROWS` with
    zero rows, whose results are cut off after. With a team, the first output, through which the team exchanges its
    units, starts as ``exchange`` (its shape, unpadded) or, if None, as `SENTINEL` everywhere."""
    from jax.experimental import pallas as pl

    batch = next(a.shape[axis] for a, axis in zip(args, batch_axes) if axis is not None)
    padded = _padded_rows(batch)

    def pad(a, axis):
        return a if axis is None else jnp.pad(a, [(0, padded - batch if d == axis else 0) for d in range(a.ndim)])

    def spec(shape, axis):
        if axis is None:
            return pl.BlockSpec(shape, lambda m, b: (0,) * len(shape))
        block = shape[:axis] + (ROWS,) + shape[axis + 1:]
        return pl.BlockSpec(block, lambda m, b, axis=axis, rank=len(shape): tuple(b if d == axis else 0
                                                                                   for d in range(rank)))

    args = [pad(a, axis) for a, axis in zip(args, batch_axes)]
    out_full = [jax.ShapeDtypeStruct(s[:axis] + (padded,) + s[axis + 1:], jnp.float32)
                for s, axis in zip(out_shapes, out_batch_axes)]
    start, aliases = [], {}
    if members > 1:
        start = [pad(exchange, out_batch_axes[0]) if exchange is not None else
                 jax.lax.bitcast_convert_type(jnp.full(out_full[0].shape, SENTINEL, jnp.int32), jnp.float32)]
        aliases = {len(args): 0}
        kernel = functools.partial(_without_input, kernel, len(args))
    outs = pl.pallas_call(
        kernel, grid=(members, padded // ROWS), name=name,
        in_specs=[spec(a.shape, axis) for a, axis in zip([*args, *start], [*batch_axes, *out_batch_axes[:1]])],
        out_specs=[spec(o.shape, axis) for o, axis in zip(out_full, out_batch_axes)],
        out_shape=out_full, interpret=interpret, input_output_aliases=aliases,
        **({} if interpret else {"compiler_params": _compiler_params()}))(*args, *start)
    return [jax.lax.slice_in_dim(o, 0, batch, axis=axis) for o, axis in zip(outs, out_batch_axes)]


def _without_input(kernel, index: int, *refs, **params):
    """``kernel`` on ``refs`` without the input ``index`` (the first output's starting values, aliased to it)."""
    return kernel(*refs[:index], *refs[index + 1:], **params)


def _run(kernel, operands, batch_axes, out_shapes, out_batch_axes, valid, interpret, members=None, exchange=None,
         **params):
    """``kernel`` (with ``params``, each step's inputs read ahead where `read_ahead`) on ``operands`` and, with a
    padding mask, ``valid [T, B]`` (booleans; the kernels read float32 ones and zeros) after them, by teams of
    `team_size` programs. The steps are the leading axis of the operands ``[T, B, ...]`` (batch axis 1); ``W_h`` is
    the first operand.

    Pallas's interpreter runs the programs one after another, so there a team's first program would wait for ever
    for the others: there a program works alone unless ``members`` says otherwise, and then (the tests) the team's
    exchange starts as ``exchange`` (the first output, e.g. as one program computes it, so that no program waits
    and each computes and stores its own units; None: the sentinel, so that each waits `PATIENCE` reads)."""
    steps, batch = next(a.shape[:2] for a, axis in zip(operands, batch_axes) if axis == 1)
    mask = [] if valid is None else [jnp.asarray(valid, jnp.float32)]
    members = members or (1 if interpret else team_size(operands[0].shape, batch))
    name = "rnnlab_" + kernel.__name__.strip("_").removesuffix("_kernel")
    kernel = functools.partial(kernel, steps=steps, ahead=read_ahead(), members=members, **params)
    return _call(kernel, [*operands, *mask], out_shapes, [*batch_axes, *[1] * len(mask)], out_batch_axes, interpret,
                 members, exchange, name)


# Each takes its primitive's operands (the mask apart, given as ``valid``) and returns the primitive's results, the
# backward ones without W_h's gradient; ``team``: `_run`'s ``members`` and ``exchange``, for the tests.


def rnn_forward(w_h, h0, px, valid=None, *, reverse: bool, activation: str, interpret: bool = False, **team):
    """``[hs]``, ``hs [T, B, H]`` of ``h_t = φ(px_t + h_{t-1} W_h)`` (``w_h [H, H]``, ``h0 [B, H]``, ``px [T, B,
    H]``)."""
    return _run(_rnn_forward_kernel, [w_h, h0, px], [None, 0, 1], [px.shape], [1], valid, interpret,
                reverse=reverse, activation=activation, **team)


def rnn_backward(w_h, hs, h0, g_hs, g_h, valid=None, *, reverse: bool, activation: str, interpret: bool = False,
                 **team):
    """``[g_z [T, B, H], g_h0 [B, H]]``: the cotangents of ``px`` and ``h0`` given those of ``hs`` and of the last
    carry, ``g_hs [T, B, H]`` and ``g_h [B, H]``."""
    return _run(_rnn_backward_kernel, [w_h, hs, g_hs, g_h], [None, 1, 1, 0], [hs.shape, g_h.shape],
                [1, 0], valid, interpret, reverse=reverse, activation=activation, **team)


def lstm_forward(w_h, h0, c0, px, valid=None, *, reverse: bool, interpret: bool = False, **team):
    """``[hs, cs, gates]`` (``[T, B, H]``, ``[T, B, H]``, ``[T, B, 4H]``) from ``w_h [H, 4H]``, ``h0``, ``c0`` and
    ``px [T, B, 4H]``."""
    sequence = px.shape[:2] + h0.shape[-1:]
    return _run(_lstm_forward_kernel, [w_h, h0, c0, px], [None, 0, 0, 1], [sequence, sequence, px.shape],
                [1, 1, 1], valid, interpret, reverse=reverse, **team)


def lstm_backward(w_h, gates, cs, c0, hs, h0, g_hs, g_h, g_c, valid=None, *, reverse: bool, interpret: bool = False,
                  **team):
    """``[g_z [T, B, 4H], g_h0, g_c0]``: the cotangents of ``px`` and of the first carry given those of ``hs`` and of
    the last carry (``hs`` and ``h0`` enter W_h's gradient only)."""
    return _run(_lstm_backward_kernel, [w_h, gates, cs, c0, g_hs, g_h, g_c], [None, 1, 1, 0, 1, 0, 0],
                [gates.shape, g_h.shape, g_c.shape], [1, 0, 0], valid, interpret, reverse=reverse, **team)


def gru_forward(w_h, b_h, h0, px, valid=None, *, reverse: bool, interpret: bool = False, **team):
    """``[hs, gates, a_n]`` (``[T, B, H]``, ``[T, B, 3H]``: r, z, n, ``[T, B, H]``: the n block of ``h W_h + b_h``)
    from ``w_h [H, 3H]``, ``b_h [3H]``, ``h0`` and ``px [T, B, 3H]``."""
    sequence = px.shape[:2] + h0.shape[-1:]
    return _run(_gru_forward_kernel, [w_h, b_h, h0, px], [None, None, 0, 1],
                [sequence, px.shape, sequence], [1, 1, 1], valid, interpret, reverse=reverse, **team)


def gru_backward(w_h, gates, a_n, hs, h0, g_hs, g_h, valid=None, *, reverse: bool, interpret: bool = False,
                 **team):
    """``[g_u [T, B, 3H], g_h0]``: the cotangents of the tangent's ``u`` and of ``h0`` given those of ``hs`` and of
    the last carry."""
    return _run(_gru_backward_kernel, [w_h, gates, a_n, hs, h0, g_hs, g_h],
                [None, 1, 1, 1, 0, 1, 0], [gates.shape, g_h.shape], [1, 0], valid, interpret, reverse=reverse,
                **team)
