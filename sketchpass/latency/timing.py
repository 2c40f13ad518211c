"""Timing on a noisy machine: warm-up, interleaved repeats, the median with its spread.

:func:`measure` times several callables *together*: each is first run a few times (warm-up: kernel
selection, allocations, caches), then given a number of calls per round that takes at least
``min_round_ms``, and the rounds are interleaved — round 1 of every callable, then round 2 of every
callable in another order, ... — so that a slow spell of the machine (another process, a frequency
change) falls on all of them alike.  The result per callable is the median time of one call over the
rounds and the spread (half the interquartile range of the per-round times), both in milliseconds.
Ratios between callables measured together are what the pipeline compares.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    ms: float  # median of one call
    spread: float  # half the interquartile range of the per-round medians
    rounds: int
    calls: int  # calls per round

    def to_dict(self) -> dict:
        return {"ms": self.ms, "spread": self.spread, "rounds": self.rounds, "calls": self.calls}

    @classmethod
    def from_dict(cls, d: dict) -> Timing:
        return cls(float(d["ms"]), float(d["spread"]), int(d["rounds"]), int(d["calls"]))


def _spread(xs: list[float]) -> float:
    if len(xs) < 4:
        return (max(xs) - min(xs)) / 2
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / 2


def measure(fns: dict, *, rounds: int = 7, warmup: int = 2, min_round_ms: float = 20.0, max_calls: int = 1000,
            sync: Callable[[], None] | None = None) -> dict:
    """``{key: Timing}`` for every callable of ``fns`` (see module docstring).  ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before every clock reading."""
    sync = sync or (lambda: None)
    keys = list(fns)
    calls = {}
    for k in keys:
        f = fns[k]
        for _ in range(warmup):
            f()
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        one = max(time.perf_counter() - t0, 1e-7)
        calls[k] = int(min(max_calls, max(1, min_round_ms / 1000 / one)))
    per: dict = {k: [] for k in keys}
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)] if r % 2 == 0 else list(reversed(keys))
        for k in order:
            f, n = fns[k], calls[k]
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            sync()
            per[k].append((time.perf_counter() - t0) * 1000 / n)
    return {k: Timing(statistics.median(v), _spread(v), rounds, calls[k]) for k, v in per.items()}
