"""A bounded-memory store of per-batch values (calibration batches, the refit's frontier activations).

Values are kept in memory while the store holds less than ``max_bytes`` of tensor data; beyond that they
are written (``torch.save``) to a temporary folder and read back when asked for, so the pass's memory
does not grow with the number of calibration batches.  ``peak_bytes`` is the most tensor data the store
held in memory at once, ``spilled`` how many values went to disk.  The folder is removed by
:meth:`Store.close` (and when the store is garbage-collected).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import Any

import numpy as np
import torch


def default_mode(path) -> None:
    """Give a file made by ``tempfile.mkstemp`` (mode 0600) the mode a plain ``open`` would: 0666 less the
    umask, so that an atomically written output is as readable as any other file the user writes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def nbytes(value: Any, seen: set | None = None) -> int:
    """Bytes of tensor/array data in a nested value (storages shared between tensors counted once)."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        try:
            key = value.untyped_storage().data_ptr()
        except RuntimeError:
            key = id(value)
        if key in seen:
            return 0
        seen.add(key)
        return value.untyped_storage().nbytes() if value.device.type != "meta" else 0
    if isinstance(value, np.ndarray):
        base = value.base if value.base is not None else value
        if id(base) in seen:
            return 0
        seen.add(id(base))
        return int(base.nbytes) if isinstance(base, np.ndarray) else int(value.nbytes)
    if isinstance(value, dict):
        return sum(nbytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v, seen) for v in value)
    return 0


class Store:
    """``key → value`` with at most ``max_bytes`` of tensor data in memory (see module docstring)."""

    def __init__(self, max_bytes: float, what: str = "values"):
        self.max_bytes = float(max_bytes)
        self.what = what
        self._mem: dict[Any, tuple[Any, int]] = {}
        self._disk: dict[Any, str] = {}
        self._used = 0
        self.peak_bytes = 0
        self.spilled = 0
        self._dir: str | None = None
        self._finalizer = None

    def _folder(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="sketchpass-store-")
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    def put(self, key, value) -> None:
        self.discard(key)
        size = nbytes(value)
        if self._used + size <= self.max_bytes:
            self._mem[key] = (value, size)
            self._used += size
            self.peak_bytes = max(self.peak_bytes, self._used)
            return
        path = os.path.join(self._folder(), f"{len(self._disk)}-{abs(hash(key))}.pt")
        try:
            torch.save(value, path)
        except OSError as exc:
            raise OSError(f"could not write {self.what} to the temporary folder {self._dir} ({exc}); free disk space "
                          f"or raise max_activation_mb= to keep more in memory") from exc
        self._disk[key] = path
        self.spilled += 1

    def get(self, key):
        if key in self._mem:
            return self._mem[key][0]
        if key in self._disk:
            return torch.load(self._disk[key], weights_only=False)
        raise KeyError(key)

    def discard(self, key) -> None:
        if key in self._mem:
            self._used -= self._mem.pop(key)[1]
        elif key in self._disk:
            path = self._disk.pop(key)
            if os.path.exists(path):
                os.unlink(path)

    def keys(self) -> list:
        return list(self._mem) + list(self._disk)

    def __len__(self) -> int:
        return len(self._mem) + len(self._disk)

    def close(self) -> None:
        self._mem.clear()
        self._disk.clear()
        self._used = 0
        if self._finalizer is not None:
            self._finalizer()
            self._dir = None
            self._finalizer = None
