"""Data-parallel calibration on ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Run the same script on every process (``torchrun --nproc-per-node N script.py``), each with **its own
shard** of the calibration data::

    import sketchpass as sp
    sp.distributed.init()                      # or torch.distributed.init_process_group(...) yourself
    small = sp.transform(model, sp.Budget(params=0.8), calib=my_shard, method="svd")

When a process group of more than one process is initialised, the pass runs data-parallel
(:func:`world`): every rank streams its own batches; the statistics the fits are made from are **summed
over the ranks before any fit** — the input Grams and their counts while calibrating, the cross-Grams of
every refit step, the held-out output errors of verify, the single-layer errors of the verify loop — so
they are those of the union of the shards; the per-layer work is spread over the ranks (the candidate
forms of layer ``i`` — eigendecompositions, SVDs, sketch fits — and its refitted module are made by rank
``i mod N`` and broadcast); the output sensitivities are measured on rank 0's first samples and
broadcast.  Every rank ends with the same plan and the same model, equal within float tolerance to a
single process run on the concatenated shards (rank 0's first).  Shards may have different sizes and
batch counts.  Latency budgets are refused (they time one process on its device).

**Faults.**  Every stage's local work runs inside :meth:`Dist.section`: an exception on one rank (a bad
shard, out of memory) is announced to all ranks at the stage's next collective, and every rank raises
:class:`RankFailedError` naming the rank, the stage and the error (the failing rank re-raises its own
exception) — no rank waits for one that has stopped.  A rank that dies without raising (killed) is
caught by the process group's timeout: :func:`init` sets it (``timeout_s``, default 600 s, or the
``SKETCHPASS_DIST_TIMEOUT`` environment variable); the other ranks' collectives then fail with it.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from typing import Any

import torch

DEFAULT_TIMEOUT_S = 600.0


class RankFailedError(RuntimeError):
    """Another rank of the data-parallel pass failed; the message says which, where and why."""

    _sketchpass_announced = True


def announced(exc: BaseException) -> bool:
    """Whether every rank already knows of ``exc`` (it came out of :meth:`Dist.agree`)."""
    return bool(getattr(exc, "_sketchpass_announced", False))


def _dist():
    import torch.distributed as dist

    return dist


def init(backend: str | None = None, timeout_s: float | None = None) -> Dist | None:
    """Initialise the default process group from the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ...) with a collective timeout, unless one is initialised already; returns :func:`world`.

    ``backend``: ``"gloo"`` (CPU) or ``"nccl"`` (GPUs); default NCCL when CUDA is available, else gloo.
    ``timeout_s``: the timeout of every collective (default ``SKETCHPASS_DIST_TIMEOUT`` or 600 s).  Outside
    torchrun (no ``WORLD_SIZE``) nothing is initialised and ``None`` is returned."""
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if dist.is_initialized():
        return world()
    if "WORLD_SIZE" not in os.environ:
        return None
    if timeout_s is None:
        timeout_s = float(os.environ.get("SKETCHPASS_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return world()


def world() -> Dist | None:
    """The data-parallel context when a process group of more than one process is initialised, else ``None``."""
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return Dist(dist.get_rank(), dist.get_world_size())


class Dist:
    """The ranks of the pass: sums, broadcasts, ownership and failure agreement over the default group."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
        dist = _dist()
        self.backend = dist.get_backend()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else \
            torch.device("cpu")

    # ------------------------------------------------------------------ failures
    @contextmanager
    def section(self, stage: str):
        """Local work that ends at a collective: its exception on any rank fails every rank (module docstring)."""
        err: BaseException | None = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - announced to every rank, then re-raised
            if announced(exc):  # every rank knows already (a nested section)
                raise
            err = exc
        self.agree(stage, err)

    def agree(self, stage: str, err: BaseException | None = None) -> None:
        """Every rank says whether it failed; if any did, every rank raises."""
        msg = None if err is None else f"{type(err).__name__}: {err}"
        got: list = [None] * self.size
        _dist().all_gather_object(got, msg)
        failed = [(r, m) for r, m in enumerate(got) if m is not None]
        if not failed:
            return
        if err is not None:
            err._sketchpass_announced = True
            raise err
        r, m = failed[0]
        raise RankFailedError(f"rank {r} of {self.size} failed while {stage}: {m}")

    # ------------------------------------------------------------------ collectives
    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum tensors over the ranks, in place (float64 tensors stay float64)."""
        dist = _dist()
        for t in tensors:
            if self.device.type == "cpu":
                dist.all_reduce(t)
            else:
                moved = t.to(self.device)
                dist.all_reduce(moved)
                t.copy_(moved.cpu())

    def sum_numbers(self, values: list[float]) -> list[float]:
        if not values:
            return []
        t = torch.tensor(values, dtype=torch.float64)
        self.sum_([t])
        return t.tolist()

    def gather(self, obj: Any) -> list:
        got: list = [None] * self.size
        _dist().all_gather_object(got, obj)
        return got

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        box = [obj if self.rank == src else None]
        _dist().broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def owner(self, i: int) -> int:
        return i % self.size

    def spread(self, stage: str, items: list, work) -> dict:
        """``work(items this rank owns) -> dict``, on every rank, merged from all ranks (item ``i`` is rank
        ``i mod N``'s)."""
        mine: dict = {}
        with self.section(stage):
            mine = work([x for i, x in enumerate(items) if self.owner(i) == self.rank])
        out: dict = {}
        for part in self.gather(mine):
            out.update(part)
        return out

    def same(self, what: str, value: Any) -> None:
        """Check that every rank has the same ``value`` (the structure the collectives follow)."""
        got = self.gather(value)
        bad = [r for r, v in enumerate(got) if v != got[0]]
        if bad:
            raise RuntimeError(f"the ranks disagree on {what} (rank {bad[0]} differs from rank 0): every rank must run "
                               "the same model with the same options, on batches of the same structure")


# --------------------------------------------------------------------------- statistics
def sum_gram(d: Dist, acc) -> None:
    """Sum a :class:`~sketchpass.calib.GramAccumulator` over the ranks, in place."""
    g = acc.gram  # mirrored: the sum is of full matrices
    d.sum_([g, acc.fourth, acc.sum, acc.sq_sum])
    acc.count, acc.samples, acc.calls = (int(v) for v in d.sum_numbers([acc.count, acc.samples, acc.calls]))


def sum_cross(d: Dist, acc) -> None:
    """Sum a :class:`~sketchpass.calib.CrossGramAccumulator` over the ranks, in place.  Where a rank saw only
    ``x̂ = x`` its ``W M`` was never formed (it is ``W Σ x xᵀ``); unless every rank did, it is formed first."""
    identical = all(d.gather(acc.identical))
    if not identical and acc.identical:
        if acc.wcross is not None and acc.hat.count:
            for g in range(acc.hat.groups):
                acc.wcross[g] += acc.weight[g].double() @ acc.hat.gram[g]
        acc.identical = False
    sum_gram(d, acc.hat)
    d.sum_([t for t in (acc.cross, acc.wcross, acc.sum) if t is not None])
