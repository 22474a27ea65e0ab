r"""Training with optax: full or truncated BPTT, gradient clipping, non-finite guards, evaluation, resumable runs.

`train` runs ``steps`` steps; step ``s`` trains on the batch ``batch_fn(fold_in(data_key, s))``, so the data stream's
position is the step itself and a run restored from a checkpoint sees exactly the batches it would have seen.

**Full BPTT** (``truncation=None``): one update per batch, of ``loss_fn(params, batch) -> scalar``.

**Truncated BPTT** (``truncation=Truncation(k1, k2)``; Williams & Peng 1990, in the k1/k2 form of Sutskever 2013,
§2.8.6): every leaf of the batch is time-major and ``T`` is a multiple of ``k1``. The batch is cut into chunks of
``k1`` steps and one update is made per chunk, so a batch gives ``T / k1`` updates. The update after chunk ``i`` runs
the model over the last ``k2`` steps (chunks ``i - k2/k1 + 1 .. i``) from the carry stored at the window's start with
its gradient stopped, and takes the gradient of chunk ``i``'s loss only: gradients reach at most ``k2`` steps back.
``loss_fn(params, carry, chunk) -> (loss, final_carry)``, with ``carry=None`` meaning the model's initial carry.
With ``k1 = k2 = T`` this is full BPTT.

Every update records the loss, the global norm of the raw gradient (before clipping) and of the applied update. A
non-finite loss or gradient norm leaves parameters and optimiser state untouched and, with ``on_nonfinite="stop"``
(the default), raises `NonFiniteError` naming the step; with ``"skip"`` the run goes on and the update is marked
``finite = False`` in the history. No nan is ever applied to the parameters.

**Several devices** (``batch_axes``): each leaf of the batch is split along its batch axis over a one-axis mesh
(``"batch"``) of all devices, `jax.sharding.NamedSharding`, while parameters and optimiser state are replicated;
XLA's SPMD partitioner inserts the all-reduce of the gradient, so the numbers are those of one device up to the
order of float32 sums. The built-in cells' kernels are traced split along the same axis (`rnnlab.split_batch`: each
device runs them on its own rows), so the compiled steps carry no Python callback and JAX's persistent compilation
cache serves them to a new process. The batch is drawn from a key inside the compiled step, so it is never sent from
the host and each device can make just its own slice. Within a caller's `jax.set_mesh` of auto axes, the batch is
split over that mesh instead, over all of its axes at once (its devices, which may be fewer than all; a run with
``batch_axes=None`` there is replicated on them, as JAX places a jit's results within a mesh); within one of explicit
axes (`jax.sharding`'s explicit mode), or within an abstract mesh alone (`jax.sharding.use_abstract_mesh`,
`rnnlab.split_batch`) other than `train`'s own, it raises `ValueError`. On several hosts, after
`jax.distributed.initialize()`, ``jax.devices()`` lists the devices of every host and each process runs the same
global program on its own devices (tested with two processes on one machine, CPU collectives over gloo:
``tests/test_multihost.py``); checkpoints are written by process 0, so ``checkpoint_path`` must be on a filesystem
every host sees for a resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rnnlab import checkpoint, gradflow, models, native

HISTORY_COLUMNS = ("step", "update", "loss", "grad_norm", "update_norm", "finite")


@dataclasses.dataclass(frozen=True)
class Truncation:
    """Truncated BPTT: an update every ``k1`` steps, gradients through the last ``k2`` (a multiple of ``k1``)."""

    k1: int
    k2: int

    def __post_init__(self):
        if not isinstance(self.k1, int) or not isinstance(self.k2, int) or self.k1 < 1 or self.k2 < 1:
            raise ValueError(f"k1 and k2 must be positive ints, got k1={self.k1!r}, k2={self.k2!r}.")
        if self.k2 % self.k1:
            raise ValueError(f"k2 must be a multiple of k1 (the window is whole chunks); got k1={self.k1}, "
                             f"k2={self.k2}.")

    @property
    def chunks_per_window(self) -> int:
        return self.k2 // self.k1


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient stopped a run. ``step``, ``update``, ``loss``, ``grad_norm`` say where;
    ``result`` holds the run up to there (parameters from before the bad update)."""

    def __init__(self, message: str, *, step: int, update: int, loss: float, grad_norm: float, result: "TrainResult"):
        super().__init__(message)
        self.step, self.update, self.loss, self.grad_norm, self.result = step, update, loss, grad_norm, result


@dataclasses.dataclass
class TrainResult:
    """``params`` and ``opt_state`` after the run; ``history``: one entry per update, columns `HISTORY_COLUMNS`
    (``step`` is the 0-based index of the batch); ``evals``: ``{"step": [...], metric: [...]}``, ``step`` being the
    number of batches trained on when evaluated."""

    params: Any
    opt_state: Any
    step: int
    history: dict[str, np.ndarray]
    evals: dict[str, np.ndarray]

    def step_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, mean training loss of each step's updates)``."""
        steps = self.history["step"].astype(int)
        unique = np.unique(steps)
        sums = np.bincount(steps, weights=self.history["loss"], minlength=unique.max(initial=-1) + 1)
        counts = np.bincount(steps, minlength=unique.max(initial=-1) + 1)
        return unique, sums[unique] / counts[unique]


def with_clipping(optimizer: optax.GradientTransformation, clip: float | None) -> optax.GradientTransformation:
    """``optimizer`` after `optax.clip_by_global_norm` (``clip`` ≤ 0 or ``None``: no clipping)."""
    if clip is None or clip <= 0:
        return optimizer
    return optax.chain(optax.clip_by_global_norm(clip), optimizer)


def _guarded_update(optimizer, params, opt_state, loss, grads):
    """Apply one update unless the loss or gradient is non-finite; return the new state and the update's metrics."""
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def keep_if_finite(new, old):
        return jnp.where(finite, new, old)

    params = jax.tree_util.tree_map(keep_if_finite, new_params, params)
    opt_state = jax.tree_util.tree_map(keep_if_finite, new_opt_state, opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "update_norm": optax.tree.norm(updates), "finite": finite}
    return params, opt_state, metrics


def _shardings(batch_axes, batch_fn, data_key, mesh: Mesh | None = None):
    """``(batch_sharding, state_sharding)``: every leaf of ``batch_fn``'s batch split along its axis in
    ``batch_axes`` (replicated where that is ``None``) over ``mesh`` (default: a ``"batch"`` mesh of all devices),
    over all of its axes at once, and the replication of parameters and optimiser state on it; ``(None, None)``
    without ``batch_axes`` or with one device. Bad ``batch_axes`` raise `ValueError`, with one device as with
    several."""
    if batch_axes is None:
        return None, None
    where = "the devices of the caller's jax.set_mesh" if mesh is not None else "this run's devices"
    if mesh is None:
        mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    split = _all_axes(mesh)
    batch_shapes = jax.eval_shape(batch_fn, data_key)
    device_count = mesh.size
    prefix_paths_and_axes, prefix = jax.tree_util.tree_flatten_with_path(batch_axes, is_leaf=lambda x: x is None)
    try:
        subtrees = prefix.flatten_up_to(batch_shapes)
    except ValueError as error:
        raise ValueError(f"batch_axes must be an int, None, or a pytree prefix of the batch; the batch is "
                         f"{jax.tree_util.tree_structure(batch_shapes)}: {error}") from None

    def leaf_spec(prefix_path, axis, path, shape):
        name = f"batch leaf {jax.tree_util.keystr((*prefix_path, *path)) or '(the whole batch)'} of shape {shape.shape}"
        if axis is None:
            return PartitionSpec()
        if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or not -shape.ndim <= axis < shape.ndim:
            raise ValueError(f"batch_axes gives axis {axis!r} for the {name}; wanted an int in "
                             f"[{-shape.ndim}, {shape.ndim}) or None.")
        axis = int(axis) % shape.ndim
        if shape.shape[axis] % device_count:
            raise ValueError(f"batch_axes splits the {name} along axis {axis}, of size {shape.shape[axis]}, over "
                             f"{where}, {dict(mesh.shape)}: the batch size must be a multiple of their device count "
                             f"({device_count}); or pass batch_axes=None not to split it.")
        return PartitionSpec(*[None] * axis, split)

    specs = prefix.unflatten([jax.tree_util.tree_map_with_path(functools.partial(leaf_spec, prefix_path, axis), subtree)
                              for (prefix_path, axis), subtree in zip(prefix_paths_and_axes, subtrees)])
    if device_count == 1:
        return None, None
    batch_sharding = jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs,
                                            is_leaf=lambda x: isinstance(x, PartitionSpec))
    return batch_sharding, NamedSharding(mesh, PartitionSpec())


def _sampler(batch_fn, data_key, batch_sharding):
    """``step_index -> batch`` of that step, split over the devices by ``batch_sharding`` (unless ``None``)."""

    def sample(step_index):
        # jax_threefry_partitionable (JAX's default) makes the random bits the same however the batch is split.
        batch = batch_fn(jax.random.fold_in(data_key, step_index))
        return batch if batch_sharding is None else jax.lax.with_sharding_constraint(batch, batch_sharding)

    return sample


def _all_axes(mesh: Mesh):
    """``mesh``'s axes as one entry of a `PartitionSpec`: its name where it has one axis, else the tuple of names."""
    return mesh.axis_names if len(mesh.axis_names) > 1 else mesh.axis_names[0]


def _traced_split(mesh):
    """Where the batch is split over ``mesh`` (all its axes), the cells' kernels are traced split the same way
    (`rnnlab.native.split_batch`), so a warm persistent compilation cache holds the steps (and a jitted ``eval_fn``)
    in a new process."""
    return contextlib.nullcontext() if mesh is None else native.split_batch(mesh, _all_axes(mesh))


def _full_bptt_step(loss_fn, optimizer, sample, mesh):
    @jax.jit
    def step(params, opt_state, step_index):
        batch = sample(step_index)
        with _traced_split(mesh):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        params, opt_state, metrics = _guarded_update(optimizer, params, opt_state, loss, grads)
        return params, opt_state, [metrics]

    return step


def _time_length(batch) -> int:
    lengths = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree_util.tree_leaves(batch)}
    if len(lengths) != 1 or None in lengths:
        raise ValueError(f"truncated BPTT needs every leaf of the batch time-major with one length T; got leading "
                         f"sizes {sorted(map(str, lengths))}.")
    return lengths.pop()


def _truncated_step(loss_fn, optimizer, sample, truncation: Truncation, mesh):
    # Chunks sliced from a sharded batch keep its batch-axis sharding, and `update` follows its inputs' shardings.
    sample = jax.jit(sample)

    @jax.jit
    def update(params, opt_state, start_carry, window):
        def window_loss(params):
            carry = start_carry
            for chunk in window[:-1]:
                _, carry = loss_fn(params, carry, chunk)
            return loss_fn(params, carry, window[-1])

        with _traced_split(mesh):
            (loss, final_carry), grads = jax.value_and_grad(window_loss, has_aux=True)(params)
        params, opt_state, metrics = _guarded_update(optimizer, params, opt_state, loss, grads)
        return params, opt_state, jax.lax.stop_gradient(final_carry), metrics

    def step(params, opt_state, step_index):
        batch = sample(step_index)
        seq_len, k1 = _time_length(batch), truncation.k1
        if seq_len % k1:
            raise ValueError(f"truncation k1={k1} must divide the sequence length T={seq_len}.")
        chunks = [jax.tree_util.tree_map(lambda a, i=i: a[i * k1:(i + 1) * k1], batch) for i in range(seq_len // k1)]
        carries = [None]  # carries[i]: the carry at the start of chunk i, gradient stopped
        all_metrics = []
        for i in range(len(chunks)):
            first = max(0, i - truncation.chunks_per_window + 1)
            params, opt_state, final_carry, metrics = update(params, opt_state, carries[first],
                                                             tuple(chunks[first:i + 1]))
            carries.append(final_carry)
            all_metrics.append(metrics)
        return params, opt_state, all_metrics

    return step


def _rows(columns: dict[str, np.ndarray]) -> list[dict]:
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*(columns[name] for name in names))]


def _columns(names, rows) -> dict[str, np.ndarray]:
    return {name: np.asarray([row[name] for row in rows], np.float64) for name in names}


class _Progress:
    """One line to stderr every ``every`` steps: a bar, the step, the last metrics, the speed."""

    def __init__(self, total: int, every: int, first_step: int, enabled: bool):
        self.total, self.every, self.enabled = total, every, enabled and every > 0
        self.start_time, self.start_step = time.perf_counter(), first_step

    def __call__(self, step: int, train_loss: float, grad_norm: float, evaluation: dict | None) -> None:
        if not self.enabled or (step % self.every and step != self.total):
            return
        done = int(20 * step / max(self.total, 1))
        rate = (step - self.start_step) / max(time.perf_counter() - self.start_time, 1e-9)
        text = f"[{'=' * done}{' ' * (20 - done)}] step {step}/{self.total} loss {train_loss:.4g} |g| {grad_norm:.3g}"
        if evaluation:
            text += " " + " ".join(f"{name} {value:.4g}" for name, value in evaluation.items() if name != "step")
        print(f"{text} ({rate:.1f} steps/s)", file=sys.stderr, flush=True)


def train(
    loss_fn: Callable,
    params: Any,
    optimizer: optax.GradientTransformation,
    batch_fn: Callable[[jax.Array], Any],
    *,
    steps: int,
    data_key: jax.Array,
    clip: float | None = None,
    truncation: Truncation | None = None,
    batch_axes: Any = None,
    on_nonfinite: str = "stop",
    eval_fn: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 100,
    log_every: int = 100,
    progress: bool = True,
    checkpoint_path: str | None = None,
    checkpoint_every: int = 100,
    callback: Callable[[int, Any], None] | None = None,
) -> TrainResult:
    """Train ``params`` for ``steps`` batches and return a `TrainResult`.

    **Arguments:**

    - ``loss_fn``: ``(params, batch) -> scalar`` for full BPTT; ``(params, carry, chunk) -> (scalar, carry)`` with
      ``truncation`` (see the module docstring).
    - ``optimizer``: any optax transformation; ``clip`` puts `optax.clip_by_global_norm` before it.
    - ``batch_fn``: ``key -> batch``, pure and jittable; step ``s`` uses ``fold_in(data_key, s)``.
    - ``batch_axes``: with several devices, split every batch over all of them, or over the caller's
      `jax.set_mesh` mesh where there is one (see the module docstring): the batch axis of each leaf, as a pytree
      prefix of the batch whose leaves are ints (an axis) or ``None`` (a leaf given whole to every device), or one
      int for every leaf; e.g. ``{"inputs": 1, "targets": 0}`` for ``inputs [T, B, I]``, ``targets [B, 1]``. Each
      batch size must be a multiple of that many devices (else `ValueError`). ``None`` (the default), or a single
      device: the batch is not split, and the run stays on the default device (within a caller's mesh JAX
      replicates it on the mesh's devices).
    - ``on_nonfinite``: ``"stop"`` (raise `NonFiniteError`) or ``"skip"`` (drop the update, carry on).
    - ``eval_fn``: ``params -> {metric: value}`` on held-out data, called before training and every ``eval_every``
      steps and at the end.
    - ``checkpoint_path``: if set, the state (params, optimiser state, step, history) is saved there atomically
      every ``checkpoint_every`` steps and at the end, and a run finding a checkpoint there resumes from it — to the
      bit the same as a run never interrupted, when called with the same arguments. The state is fetched to the
      host to be written (replicated, every device holds all of it), so a sharded run resumes on any device count.
    - ``callback``: ``(step, params) -> None`` after every step (e.g. to stop a run from outside).
    """
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}.")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}.")
    optimizer = with_clipping(optimizer, clip)
    context = jax.sharding.get_abstract_mesh()
    if AxisType.Explicit in context.axis_types:
        raise ValueError(f"train was called within jax.set_mesh of {context}, whose explicit axes (jax.sharding's "
                         "explicit mode) it does not take: it splits the batch (batch_axes) in JAX's default (auto) "
                         "mode. Call it outside, or within a mesh of auto axes, which it then splits the batch over.")
    caller_mesh = jax.sharding.get_mesh()  # empty within an abstract mesh alone
    batch_sharding, state_sharding = _shardings(batch_axes, batch_fn, data_key,
                                                None if caller_mesh.empty else caller_mesh)
    if state_sharding is not None and not context.empty and context != state_sharding.mesh.abstract_mesh:
        raise ValueError(f"train was called within the abstract mesh {context} (jax.sharding.use_abstract_mesh, "
                         f"rnnlab.split_batch) alone; it splits the batch over {state_sharding.mesh.abstract_mesh}, "
                         "which that context would clash with. Call it outside, or within jax.set_mesh.")
    sample = _sampler(batch_fn, data_key, batch_sharding)
    mesh = None if state_sharding is None else state_sharding.mesh
    if truncation is None:
        step_fn = _full_bptt_step(loss_fn, optimizer, sample, mesh)
    else:
        step_fn = _truncated_step(loss_fn, optimizer, sample, truncation, mesh)

    opt_state = optimizer.init(params)
    rows: list[dict] = []
    eval_rows: list[dict] = []
    first_step = 0
    if checkpoint_path is not None:
        saved = checkpoint.restore(checkpoint_path)
        if saved is not None:
            state = checkpoint.restore(checkpoint_path, {"params": params, "opt_state": opt_state, "step": 0})
            params, opt_state, first_step = state["params"], state["opt_state"], int(saved["step"])
            rows = _rows(saved["history"])
            eval_rows = _rows(saved["evals"])
    if state_sharding is not None:
        params, opt_state = jax.device_put((params, opt_state), state_sharding)

    def result(step):
        eval_names = ("step", *(name for name in (eval_rows[0] if eval_rows else {}) if name != "step"))
        return TrainResult(params, opt_state, step, _columns(HISTORY_COLUMNS, rows),
                           _columns(eval_names, eval_rows) if eval_rows else {})

    def save(step):
        # Every process holds the same replicated state; on several hosts one of them writes it.
        if checkpoint_path is not None and jax.process_index() == 0:
            run = result(step)
            checkpoint.save(checkpoint_path, jax.device_get({"params": params, "opt_state": opt_state, "step": step,
                                                             "history": run.history, "evals": run.evals}))

    def evaluate(step):
        if eval_fn is None:
            return None
        with _traced_split(mesh):  # a jitted eval_fn traced here splits its kernels too
            values = eval_fn(params)
        row = {"step": step, **{name: float(value) for name, value in values.items()}}
        eval_rows.append(row)
        return row

    last_eval = evaluate(0) if first_step == 0 else None
    show = _Progress(steps, log_every, first_step, progress)
    for step in range(first_step, steps):
        params, opt_state, metrics = step_fn(params, opt_state, step)
        metrics = jax.device_get(metrics)
        for update, values in enumerate(metrics):
            rows.append({"step": step, "update": update, **{k: float(v) for k, v in values.items()}})
            if not values["finite"] and on_nonfinite == "stop":
                message = (f"non-finite training at step {step} (update {update} of that step): loss "
                           f"{float(values['loss'])}, gradient norm {float(values['grad_norm'])}. The update was not "
                           "applied; the run stops. Lower the learning rate, clip gradients (clip=...), or pass "
                           "on_nonfinite='skip' to drop such updates.")
                raise NonFiniteError(message, step=step, update=update, loss=float(values["loss"]),
                                     grad_norm=float(values["grad_norm"]), result=result(step))
        done = step + 1
        if eval_fn is not None and (done % eval_every == 0 or done == steps):
            last_eval = evaluate(done)
        losses = [float(values["loss"]) for values in metrics]
        show(done, float(np.mean(losses)), float(metrics[-1]["grad_norm"]), last_eval)
        if done % checkpoint_every == 0 and done != steps:
            save(done)
        if callback is not None:
            callback(done, params)
    final_step = max(steps, first_step)
    save(final_step)
    return result(final_step)


def count_nonfinite(result: TrainResult) -> int:
    """How many updates of a run were dropped as non-finite."""
    return int(np.sum(result.history["finite"] == 0)) if len(result.history["finite"]) else 0



def _predictions(model, params, inputs, carry=None):
    """A model's outputs and final carry: `ManyToMany` returns both, `ManyToOne` only outputs (carry ``None``)."""
    outputs = model(params, inputs) if carry is None else model(params, inputs, carry=carry)
    return outputs if isinstance(outputs, tuple) else (outputs, None)


def task_losses(task, model):
    """``(loss_fn, chunk_loss_fn, metrics_fn)`` of ``model`` on ``task``: the full-BPTT loss ``(params, batch)``,
    the truncated-BPTT chunk loss ``(params, carry, chunk) -> (loss, carry)`` (for `ManyToMany` models) and
    ``(params, batch) -> {"loss", "accuracy" when the task has one, and the task's ``decoded_metrics``}``.

    A task whose batch is more than ``inputs`` (a sequence-to-sequence task's targets, fed back by teacher forcing)
    says how the model reads it: ``task.predict(model, params, batch) -> outputs``."""

    def predict(params, batch):
        if hasattr(task, "predict"):
            return task.predict(model, params, batch)
        return _predictions(model, params, batch["inputs"])[0]

    def loss_fn(params, batch):
        return task.loss(predict(params, batch), batch)

    def chunk_loss_fn(params, carry, chunk):
        outputs, carry = model(params, chunk["inputs"], carry=carry)
        return task.loss(outputs, chunk), carry

    def metrics_fn(params, batch):
        outputs = predict(params, batch)
        metrics = {"loss": task.loss(outputs, batch)}
        if hasattr(task, "accuracy"):
            metrics["accuracy"] = task.accuracy(outputs, batch)
        if hasattr(task, "decoded_metrics"):
            metrics.update(task.decoded_metrics(model, params, batch))
        return metrics

    return loss_fn, chunk_loss_fn, metrics_fn


def _task_batch_axes(task, batch_size: int):
    """The batch axis of each leaf of ``task.sample(key, batch_size)``: the one axis whose size follows
    ``batch_size`` (found from shapes alone, `jax.eval_shape` at ``batch_size`` and ``batch_size + 1``), ``None``
    for a leaf without one. A pytree like the batch, for `train`'s ``batch_axes``: e.g. ``{"inputs": 1,
    "targets": 0}`` for `rnnlab.tasks.AddingProblem`."""
    key = jax.random.key(0)
    shapes, grown = (jax.eval_shape(lambda key, size=size: task.sample(key, size), key)
                     for size in (batch_size, batch_size + 1))

    def batch_axis(path, shape, grown_shape):
        axes = [axis for axis, (a, b) in enumerate(zip(shape.shape, grown_shape.shape)) if a != b]
        if len(axes) > 1:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} of shape {shape.shape} grows with the batch "
                             f"size along axes {axes}; pass batch_axes explicitly.")
        return axes[0] if axes else None

    return jax.tree_util.tree_map_with_path(batch_axis, shapes, grown)


def train_on_task(task, model, *, seed: int, steps: int, batch_size: int, learning_rate: float,
                  clip: float | None = None, truncation: Truncation | None = None, test_size: int = 1000,
                  eval_every: int = 100, optimizer: optax.GradientTransformation | None = None,
                  params: Any = None, **train_options) -> TrainResult:
    """Train ``model`` on ``task`` from seed ``seed`` with Adam (or ``optimizer``) and evaluate on held-out data.

    Keys: parameters from ``fold_in(key(seed), 0)``, the data stream from ``fold_in(key(seed), 1)``, the test set
    (``task.test_batch()`` when the task has a fixed one, else ``test_size`` fresh sequences) from
    ``fold_in(key(seed), 2)``. ``evals`` hold ``test_loss`` (and ``test_accuracy``). Other options go to `train`;
    ``batch_axes`` defaults to each leaf's batch axis, the one whose size follows ``batch_size`` (from
    `jax.eval_shape`), so with several devices every batch is split over all of them, or over the caller's
    `jax.set_mesh` mesh (``batch_size`` a multiple of their count; ``batch_axes=None`` does not split it).
    """
    root = jax.random.key(seed)
    if params is None:
        # a Seq2Seq model knows its vocabularies; the other shapes take the task's input size
        init_key = jax.random.fold_in(root, 0)
        params = model.init(init_key, task.input_size) if hasattr(task, "input_size") else model.init(init_key)
    if hasattr(task, "test_batch"):
        test = task.test_batch()
    else:
        test = task.sample(jax.random.fold_in(root, 2), test_size)
    loss_fn, chunk_loss_fn, metrics_fn = task_losses(task, model)
    evaluate = jax.jit(metrics_fn)
    return train(
        chunk_loss_fn if truncation is not None else loss_fn,
        params,
        optimizer if optimizer is not None else optax.adam(learning_rate),
        lambda key: task.sample(key, batch_size),
        steps=steps,
        data_key=jax.random.fold_in(root, 1),
        clip=clip,
        truncation=truncation,
        eval_fn=lambda p: {f"test_{name}": value for name, value in evaluate(p, test).items()},
        eval_every=eval_every,
        **{"batch_axes": _task_batch_axes(task, batch_size), **train_options},
    )


def curve_records(result: TrainResult, **labels) -> dict[str, np.ndarray]:
    """One row per evaluation: ``labels`` (e.g. cell, seq_len, seed), ``step``, ``train_loss`` (mean training loss
    of the steps since the previous evaluation), the test metrics, ``max_grad_norm`` over those steps and
    ``nonfinite`` (updates dropped over those steps)."""
    steps, losses = result.step_losses()
    eval_steps = result.evals["step"].astype(int)
    history_steps = result.history["step"].astype(int)
    rows: dict[str, list] = {name: [] for name in (*labels, "step", "train_loss")}
    extra = [name for name in result.evals if name != "step"]
    rows.update({name: [] for name in (*extra, "max_grad_norm", "nonfinite")})
    previous = 0
    for index, step in enumerate(eval_steps):
        in_window = (steps >= previous) & (steps < max(step, 1))
        in_history = (history_steps >= previous) & (history_steps < max(step, 1))
        for name, value in labels.items():
            rows[name].append(value)
        rows["step"].append(step)
        rows["train_loss"].append(float(np.mean(losses[in_window])) if step and in_window.any() else float("nan"))
        for name in extra:
            rows[name].append(float(result.evals[name][index]))
        grad_norms = result.history["grad_norm"][in_history]
        rows["max_grad_norm"].append(float(np.max(grad_norms)) if step and grad_norms.size else float("nan"))
        rows["nonfinite"].append(int(np.sum(result.history["finite"][in_history] == 0)) if step else 0)
        previous = step
    return {name: np.asarray(values) for name, values in rows.items()}


def readout_grad_norms(task, model, params, batch) -> jax.Array:
    """``log10 ||∂L/∂h_t||`` for ``t = 0 .. T-1`` (`rnnlab.gradflow.grad_norms`, exact in the log domain) of a
    `rnnlab.models.ManyToOne` model's task loss on ``batch``, through its readout of the last step: how much of the
    training signal reaches each step, the quantity Arjovsky, Shah & Bengio (2016) plot before and after
    training. **Returns:** ``[T]``."""

    def loss(hs):  # hs: the cell's outputs [T, B, H], the readout's input
        return task.loss(models.dense(params["readout"], hs[-1]), batch)

    return gradflow.grad_norms(model.cell, params["cell"], batch["inputs"], loss=loss)
