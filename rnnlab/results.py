"""Result files: run folders that resume, tidy CSV / JSON records with provenance, and a progress bar.

Everything written here is a safe format (CSV, JSON, ``.npz`` loaded with ``allow_pickle=False``) and every write is
atomic (a temporary file, then `os.replace`), so a run killed at any moment leaves either the old file or the new one,
never a broken one.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Iterable, Mapping, Sequence, TypeVar

import numpy as np

Item = TypeVar("Item")


def _atomic_write(path: Path, write, mode: str = "wb") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(temporary, 0o644)  # mkstemp makes the file private; results are for everyone to read
    try:
        with os.fdopen(handle, mode, **({"newline": ""} if "b" not in mode else {})) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON (non-finite floats as the strings "nan", "inf", "-inf"), atomically."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, np.generic):
            return clean(value.item())
        return value

    text = json.dumps(clean(obj), indent=2) + "\n"
    _atomic_write(Path(path), lambda stream: stream.write(text.encode()))


def write_csv(path, table: Mapping[str, np.ndarray]) -> None:
    """Write a column table as CSV with a header row, atomically."""
    columns = list(table)
    arrays = [np.asarray(table[column]) for column in columns]

    def write(stream):
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(columns)
        for start in range(0, len(arrays[0]) if arrays else 0, 65536):
            writer.writerows(zip(*(array[start:start + 65536].tolist() for array in arrays)))

    _atomic_write(Path(path), write, mode="w")


def read_csv(path) -> dict[str, np.ndarray]:
    """Read a CSV written by `write_csv` back into columns (numbers parsed, booleans from "True"/"False")."""
    with open(path, newline="") as stream:
        reader = csv.reader(stream)
        columns = next(reader)
        values = list(zip(*reader)) or [()] * len(columns)
    return {column: _parse(np.asarray(column_values)) for column, column_values in zip(columns, values)}


def _parse(strings: np.ndarray) -> np.ndarray:
    if strings.size and np.all(np.isin(strings, ("True", "False"))):
        return strings == "True"
    for kind in (np.int64, np.float64):
        try:
            return strings.astype(kind)
        except ValueError:
            continue
    return strings


def provenance(argv: Sequence[str] | None = None) -> dict:
    """The exact command, library versions, git commit and devices: what every result file carries."""
    import jax

    argv = sys.argv if argv is None else argv
    versions = {}
    for package in ("rnnlab", "jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).parent).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "command": shlex.join([Path(sys.executable).name, *argv]),
        "versions": versions,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "devices": [str(device) for device in jax.devices()],
        "platform": jax.default_backend(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class RunFolder:
    """A folder that a long experiment fills one unit at a time, so an interrupted run resumes.

    Each unit (e.g. one (cell, T) program of a sweep) is saved as ``units/<name>.npz`` once complete. A restarted run
    loads the saved units and computes only the rest: nothing is lost and nothing is computed or written twice.
    """

    def __init__(self, path, config: Mapping | None = None):
        """Open (or create) the run folder at ``path``. If ``config`` is given it is stored on creation, and a
        restart with a different config raises instead of mixing results of two studies."""
        self.path = Path(path)
        (self.path / "units").mkdir(parents=True, exist_ok=True)
        if config is not None:
            config_path = self.path / "config.json"
            wanted = json.loads(json.dumps(dict(config)))
            if config_path.exists() and self.done():
                stored = json.loads(config_path.read_text())
                if stored != wanted:
                    raise ValueError(f"{self.path} holds a run with config {stored}; this run has {wanted}. Use "
                                     "another --out folder, or delete this one to start again.")
            write_json(config_path, wanted)

    def _unit_path(self, *key) -> Path:
        name = "__".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", str(part)) for part in key)
        return self.path / "units" / f"{name}.npz"

    def load(self, *key) -> dict[str, np.ndarray] | None:
        """The saved columns of unit ``key``, or ``None`` if it is not done."""
        path = self._unit_path(*key)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as saved:
            return {column: saved[column] for column in saved.files}

    def save(self, *key, table: Mapping[str, np.ndarray]) -> None:
        """Save unit ``key``'s columns, atomically: the unit counts as done only once the whole file is in place."""
        arrays = {column: np.asarray(values) for column, values in table.items()}
        _atomic_write(self._unit_path(*key), lambda stream: np.savez(stream, **arrays))

    def done(self) -> list[str]:
        return sorted(path.stem for path in (self.path / "units").glob("*.npz"))


def progress(items: Iterable[Item], *, stream=None, width: int = 30) -> Iterable[Item]:
    """A text progress bar over ``items`` on stderr, with elapsed time and an estimate of the time left."""
    items = list(items)
    stream = sys.stderr if stream is None else stream
    start = time.perf_counter()
    for done, item in enumerate(items):
        _draw(stream, done, len(items), start, width, item)
        yield item
    _draw(stream, len(items), len(items), start, width, "done")
    stream.write("\n")


def _draw(stream, done, total, start, width, label) -> None:
    elapsed = time.perf_counter() - start
    left = elapsed / done * (total - done) if done else float("nan")
    filled = int(width * done / max(total, 1))
    label = label if isinstance(label, str) else " ".join(str(part) for part in label if isinstance(part, (str, int)))
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:6.1f}s "
                 f"(~{left:5.1f}s left) {label[:40]:<40}")
    stream.flush()
