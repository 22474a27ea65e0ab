"""Checkpoints: a pytree of arrays and numbers written with flax's msgpack serialisation (no pickle), atomically.

A write goes to a temporary file in the same folder, is flushed to disk, then renamed over the checkpoint with
`os.replace` (atomic on POSIX): a run killed during a save leaves the previous checkpoint whole, never half a file.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any


def _serialization():
    # Imported on first use: flax costs 0.13 s of every `import rnnlab`, and most runs never checkpoint.
    from flax import serialization

    return serialization


def save(path: str | os.PathLike, tree: Any) -> None:
    """Write ``tree`` (params, optimiser state, step, ... — any pytree flax can serialise) to ``path`` atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    data = _serialization().to_bytes(tree)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def restore(path: str | os.PathLike, target: Any = None) -> Any | None:
    """The tree saved at ``path``, in the structure of ``target`` (a tree like the one saved: its leaves give the
    structure, not the values), or as nested dicts of arrays without ``target``; ``None`` when there is no
    checkpoint at ``path``.

    Raises `ValueError` when the file does not hold a tree of ``target``'s structure (a checkpoint of another run).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as file:
        data = file.read()
    serialization = _serialization()
    if target is None:
        return serialization.msgpack_restore(data)
    try:
        return serialization.from_bytes(target, data)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"checkpoint {path!r} does not match this run's state (different model, optimiser or "
                         f"options?): {error}") from error
