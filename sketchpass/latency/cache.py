"""The timing table: measured layer forms on disk, keyed by everything the time depends on.

A key joins the target (runtime and version, device, threads — :meth:`Target.key`), the layer's op and
geometry, its input shape and dtype, and the form (``dense``, ``svd`` with its rank, ``sketch`` with its
``m``).  Planning the same model again on the same target reads its forms from the table instead of
timing them.  The default table is ``$SKETCHPASS_TIMING_TABLE`` or ``<cache>/latency/timings.json``
(``$SKETCHPASS_CACHE``, else ``$XDG_CACHE_HOME/sketchpass``, else ``~/.cache/sketchpass``);
``timing_table=`` names another file, e.g. one built for a device with ``sketchpass profile`` and copied
along.  Writes are atomic (temporary file and rename), so a run that is interrupted never leaves a
half-written table.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .timing import Timing

VERSION = 1


def cache_root() -> Path:
    env = os.environ.get("SKETCHPASS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sketchpass"


def default_table() -> Path:
    """``$SKETCHPASS_TIMING_TABLE``, else ``<cache>/latency/timings.json``."""
    env = os.environ.get("SKETCHPASS_TIMING_TABLE")
    return Path(env).expanduser() if env else cache_root() / "latency" / "timings.json"


class TimingCache:
    """``key → Timing``, read from and written back to one JSON file."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_table()
        self.entries: dict[str, dict] = {}
        self.hits = self.misses = 0
        self._dirty = False
        if self.path.exists():
            try:
                d = json.loads(self.path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"timing table {str(self.path)!r} is not readable JSON ({exc}); delete it or name "
                                 "another with timing_table=") from None
            if not isinstance(d, dict) or d.get("format") != "sketchpass.timings":
                raise ValueError(f"{str(self.path)!r} is not a sketchpass timing table")
            if d.get("version") == VERSION:
                self.entries = dict(d.get("entries", {}))

    def get(self, key: str) -> Timing | None:
        e = self.entries.get(key)
        if e is None:
            self.misses += 1
            return None
        self.hits += 1
        return Timing.from_dict(e)

    def put(self, key: str, t: Timing) -> None:
        self.entries[key] = t.to_dict()
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": "sketchpass.timings", "version": VERSION, "entries": self.entries}, f)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._dirty = False
