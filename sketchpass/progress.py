"""Progress bars on stderr for the long stages of the pass (rich), shown when stderr is a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _enabled(flag: bool | None) -> bool:
    if flag is None:
        return sys.stderr.isatty()
    return bool(flag)


@contextlib.contextmanager
def progress_bar(description: str, total: float | None, enabled: bool | None) -> Iterator:
    """A rich progress bar on stderr; yields ``advance(n=1, label=None)``."""
    if not _enabled(enabled):
        yield lambda *a, **k: None
        return
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[label]}"), TimeElapsedColumn(), console=console, transient=True) as p:
        task = p.add_task(description, total=total, label="")

        def advance(n: float = 1, label: str | None = None):
            p.update(task, advance=n, label=label or "")

        yield advance
