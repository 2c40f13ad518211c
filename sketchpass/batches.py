"""Calibration batches: plumbing for torch batches, and the stream that both frontends read them from.

Torch batches are a tensor, a tuple/list of tensors (``model(*batch)``) or a dict of keyword arguments
(``model(**batch)``); ONNX batches are feed dicts (validated in :mod:`sketchpass.onnx.feeds`).

:class:`Calib` is the one place where calibration data is read.  It streams: every pass over the data
(observe, refit, verify) reads the batches again from the source, one at a time, so memory holds one
batch (plus what the stage keeps) whatever the number of batches.  A source that can be read only
once (a generator, a shuffling DataLoader) is kept, as it is read the first time, in a
:class:`~sketchpass.store.Store` (memory up to ``max_activation_mb``, then a temporary folder).

**Held-out batches.**  With ``holdout=h`` (default 8), batch ``i`` is kept out of fitting when
``i % h == h - 1``; with fewer than ``h`` batches the last one is; a single batch of ``n ≥ 2``
samples gives its last ``⌈n/h⌉`` samples.  One batch of one sample leaves nothing to hold out, and
the output error is then not measured (the plan says so).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .store import Store


def iter_batches(calib: Any, max_batches: int | None = None) -> Iterator[Any]:
    """Yield calibration batches from a tensor, a tuple, a dict, an iterable of those, or a DataLoader.

    A single tensor / tuple / dict is one batch.  DataLoader items that are ``(inputs, labels)``
    pairs are *not* unpacked automatically — pass ``(x for x, _ in loader)`` for that.
    """
    if calib is None:
        return
    if isinstance(calib, (torch.Tensor, dict)):
        yield calib
        return
    if isinstance(calib, tuple) and all(isinstance(t, torch.Tensor) for t in calib):
        yield calib
        return
    if not isinstance(calib, Iterable):
        raise TypeError(f"calib must be a tensor, a tuple or dict of tensors, or an iterable of those "
                        f"(e.g. a DataLoader); got {type(calib).__name__}")
    for i, batch in enumerate(calib):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def call_model(model: torch.nn.Module, batch: Any):
    """Run ``model`` on one calibration batch: tensor → ``model(x)``, tuple/list → ``model(*b)``,
    dict → ``model(**b)`` (e.g. tokenizer output)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return model(**dict(batch))
    raise TypeError(f"a calibration batch must be a tensor, a tuple/list of tensors or a dict of keyword "
                    f"arguments; got {type(batch).__name__}")


def batch_size(batch: Any) -> int:
    """Number of samples in a batch (leading dim of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if hasattr(batch, "values") else batch
    for t in items:
        if isinstance(t, torch.Tensor) and t.dim():
            return int(t.shape[0])
    return 1


def slice_batch(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (tensors whose leading dim is the batch size are sliced)."""
    size = batch_size(batch)

    def cut(t):
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == size:
            return t[:n]
        return t

    if isinstance(batch, torch.Tensor):
        return cut(batch)
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(t) for t in batch)
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return {k: cut(v) for k, v in dict(batch).items()}
    return batch


def move_batch(batch: Any, device) -> Any:
    """``batch`` (a tensor, or tuples/lists/dicts of them) with every tensor moved to ``device``."""
    return _map_tensors(batch, lambda t: t.to(device))


def token_mask(batch: Any) -> torch.Tensor | None:
    """The real (not padded) tokens of a batch: its ``attention_mask`` (a dict batch's ``(samples, tokens)``
    tensor of zeros and ones, the Hugging Face convention) as booleans, or ``None`` when there is none or it
    masks nothing.  The input Grams and the refit then count the real tokens' rows only: a padded position's
    activations are computed by the model but are not data (:func:`sketchpass.fx.observe.layer_input`)."""
    if not isinstance(batch, dict):
        return None
    m = batch.get("attention_mask")
    if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.is_complex():
        return None
    keep = m != 0
    if bool(keep.all()) or not bool(((m == 0) | (m == 1)).all()):
        return None  # nothing padded, or not a 0/1 mask (an additive float mask): every row counts
    return keep


def output_tensors(out) -> list[torch.Tensor]:
    """Floating-point tensors of a model output (tensor, tuple/list, dict / HF ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out] if torch.is_floating_point(out) else []
    if isinstance(out, dict) or hasattr(out, "values") and callable(out.values):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in output_tensors(v)]
    return []


def _map_tensors(batch: Any, fn) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_tensors(b, fn) for b in batch)
    if isinstance(batch, dict):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    return batch


def _named_leaves(batch: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return [("input 0", batch)]
    if isinstance(batch, (tuple, list)):
        return [(f"input {j}", t) for j, t in enumerate(batch) if isinstance(t, torch.Tensor)]
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return [(f"input {k!r}", t) for k, t in dict(batch).items() if isinstance(t, torch.Tensor)]
    return []


def check_batch(batch: Any, index: int, dtype: torch.dtype | None, notes: list[str]) -> Any:
    """Validate one torch calibration batch at the edge: an empty batch or NaN / inf in a floating-point
    tensor is an error naming the batch and the input; floating-point tensors of another precision than
    the model's are cast to it (said once in ``notes``); integer tensors (token ids) are left alone."""
    if not isinstance(batch, (torch.Tensor, tuple, list, dict)) and not hasattr(batch, "keys"):
        raise TypeError(f"calibration batch {index}: a batch must be a tensor, a tuple/list of tensors or a dict of "
                        f"keyword arguments; got {type(batch).__name__}")
    leaves = _named_leaves(batch)
    for name, t in leaves:
        if t.dim() and t.shape[0] == 0:
            raise ValueError(f"calibration batch {index}: {name} is empty (shape {list(t.shape)}: no samples)")
        if torch.is_floating_point(t):
            bad = int(t.numel() - torch.isfinite(t).sum())
            if bad:
                raise ValueError(f"calibration batch {index}: {name} has {bad:,} NaN or inf value(s) of {t.numel():,}; "
                                 "calibration data must be finite")
    if dtype is None or not any(torch.is_floating_point(t) and t.dtype != dtype for _, t in leaves):
        return batch
    for name, t in leaves:
        if torch.is_floating_point(t) and t.dtype != dtype:
            note = f"calibration {name} given as {t.dtype}, cast to the model's {dtype}"
            if note not in notes:
                notes.append(note)
    return _map_tensors(batch, lambda t: t.to(dtype) if torch.is_floating_point(t) else t)


def _is_image(t: torch.Tensor) -> bool:
    return t.dim() == 4 and torch.is_floating_point(t) and t.device.type == "cpu"


def leaves(batch: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _map_tensors(batch, lambda t: out.append(t) or t)
    return out


def fingerprint(batch: Any) -> str:
    """A digest of a batch's tensors (shapes, dtypes and bytes): the same batch read again has the same one."""
    h = hashlib.blake2b(digest_size=16)
    for t in leaves(batch):
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def to_channels_last(batch: Any) -> Any:
    """``batch`` with its 4-D float CPU tensors in channels-last layout."""
    return _map_tensors(batch, lambda t: t.contiguous(memory_format=torch.channels_last) if _is_image(t) else t)


def channels_last_ok(model: torch.nn.Module, batch: Any) -> bool:
    """Whether ``model`` gives the same outputs (within 1e-4 of their scale) on channels-last inputs.

    oneDNN's CPU convolutions prefer the channels-last layout, and the layout propagates from the
    input, so the passes over the calibration data get faster without touching the model (the whole
    pass is timed by ``bench/timing.py``).  Models that ``.view`` activations fail in that layout; this
    check (2 samples, both layouts) keeps those on the default layout."""
    if not any(_is_image(t) for t in leaves(batch)):
        return False
    probe = slice_batch(batch, 2)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = output_tensors(call_model(model, probe))
            out = output_tensors(call_model(model, to_channels_last(probe)))
    except RuntimeError:  # e.g. .view() on a channels-last activation
        return False
    finally:
        model.train(was_training)
    if len(ref) != len(out) or not ref:
        return False
    for a, b in zip(ref, out):
        scale = float(a.abs().max()) if a.numel() else 0.0
        if a.shape != b.shape or not bool(torch.isfinite(b).all() == torch.isfinite(a).all()) or (
                a.numel() and float((a - b).abs().max()) > 1e-4 * max(scale, 1e-12)):
            return False
    return True


def prefer_channels_last(model: torch.nn.Module, batches: list) -> list:
    """The batches in channels-last layout when :func:`channels_last_ok` on the first, else unchanged."""
    if batches and channels_last_ok(model, batches[0]):
        return [to_channels_last(b) for b in batches]
    return batches


# --------------------------------------------------------------------------- the stream
FIT, HELD = "fit", "held"
_END = object()


def one_shot(source: Any) -> bool:
    """Whether iterating ``source`` twice would not give the same batches again (an iterator, or a
    DataLoader whose sampler shuffles)."""
    if isinstance(source, Iterator):
        return True
    loader = getattr(torch.utils.data, "DataLoader", None)
    if loader is not None and isinstance(source, loader):
        return not isinstance(source.sampler, torch.utils.data.SequentialSampler)
    return False


class Calib:
    """Calibration batches, split into fitting and held-out ones, read again on every pass.

    ``open(notes)`` returns a fresh iterator of validated batches (the frontend's: torch batches or ONNX
    feeds), appending to ``notes`` what the plan should say about the data (e.g. a cast);
    ``size(batch)`` counts its samples and ``split(batch, n)`` cuts it into its first ``n`` samples and
    the rest.  ``prepare`` (optional) turns a raw batch into what the passes use (e.g. channels-last);
    it can be set after the first batch has been looked at (:meth:`first`)."""

    def __init__(self, open: Callable[[], Iterable], *, size: Callable[[Any], int],
                 split: Callable[[Any, int], tuple[Any, Any]], holdout: int = 8, max_batches: int | None = None,
                 reiterable: bool = True, max_bytes: float = 1024 * 2**20):
        self._open, self._size, self._split = open, size, split
        self.max_bytes = max_bytes
        self.holdout, self.max_batches = int(holdout), max_batches
        self.prepare: Callable[[Any], Any] | None = None
        self.notes: list[str] = []
        self._cache: Store | None = None if reiterable else Store(max_bytes, "calibration batches")
        self._cached = 0
        self._complete = False
        self._it = None
        self.counts: dict[str, int] | None = None  # after a full pass: batches/samples of each role

    # ------------------------------------------------------------------ raw batches
    def _raw(self) -> Iterator[Any]:
        if self._cache is None:  # read the source again
            for i, batch in enumerate(self._open(self.notes)):
                if self.max_batches is not None and i >= self.max_batches:
                    break
                yield batch
            return
        # a one-shot source: what was read is replayed from the store, the rest read once, in order
        if self._it is None:
            self._it = iter(self._open(self.notes))
        for i in range(self._cached):
            yield self._cache.get(i)
        while not self._complete:
            if self.max_batches is not None and self._cached >= self.max_batches:
                self._complete = True
                break
            batch = next(self._it, _END)
            if batch is _END:
                self._complete = True
                break
            self._cache.put(self._cached, batch)
            self._cached += 1
            yield batch

    def first(self) -> Any:
        """The first batch (raw), or ``None`` when there is none."""
        for b in self._raw():
            return b
        return None

    # ------------------------------------------------------------------ roles
    def _roles(self) -> Iterator[tuple[str, Any]]:
        h = self.holdout
        counts = {"batches": 0, "samples": 0, "holdout_batches": 0, "holdout_samples": 0}
        it = iter(self._raw())
        prev = next(it, None)
        if prev is None:
            self.counts = counts
            return
        i = 0
        for nxt in it:
            role = HELD if h and i % h == h - 1 else FIT
            yield self._count(counts, role, prev)
            prev, i = nxt, i + 1
        # the last batch (index i of T = i + 1): held out by the rule, or as the one held-out batch when
        # there are fewer than h; a lone batch gives its last samples instead
        if h and (i % h == h - 1 or 1 <= i < h - 1):
            yield self._count(counts, HELD, prev)
        elif h and i == 0 and self._size(prev) >= 2:
            n = self._size(prev)
            head, tail = self._split(prev, n - math.ceil(n / h))
            yield self._count(counts, FIT, head)
            yield self._count(counts, HELD, tail)
        else:
            yield self._count(counts, FIT, prev)
        self.counts = counts

    def _count(self, counts, role, batch):
        n = self._size(batch)
        if role == FIT:
            counts["batches"] += 1
            counts["samples"] += n
        else:
            counts["holdout_batches"] += 1
            counts["holdout_samples"] += n
        return role, batch

    def size(self, batch) -> int:
        return self._size(batch)

    def head(self, batch, n: int):
        """The first ``n`` samples of ``batch`` (the batch itself when it has no more)."""
        return batch if self._size(batch) <= n else self._split(batch, n)[0]

    def pieces(self, batch, per_sample_bytes: float) -> Iterator[Any]:
        """``batch`` cut into consecutive pieces of whole samples whose ``per_sample_bytes`` stay within
        ``max_bytes`` (at least one sample each); the batch itself when it fits."""
        n = max(1, int(self.max_bytes // max(per_sample_bytes, 1)))
        while self._size(batch) > n:
            head, batch = self._split(batch, n)
            yield head
        yield batch

    def _select(self, want: str) -> Iterator[Any]:
        for role, batch in self._roles():
            if role == want:
                yield self.prepare(batch) if self.prepare is not None else batch

    def fit(self) -> Iterator[Any]:
        """The batches to fit on (everything but the held-out ones), one at a time."""
        return self._select(FIT)

    def held_out(self) -> Iterator[Any]:
        """The held-out batches, one at a time."""
        return self._select(HELD)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
