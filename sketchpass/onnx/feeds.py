"""Calibration feeds for ONNX Runtime: validated at the edge, one batch at a time.

``calib`` is one of

* an iterable of feed dicts ``{input name: array}`` (numpy arrays or torch tensors); shapes may vary
  from batch to batch wherever the model's input dims are symbolic (e.g. a dynamic width);
* a single feed dict (one batch), or a single array / tensor for a one-input model;
* a path to an ``.npz`` file with one array per input name, split along axis 0 into batches of
  ``batch_size`` (default 32) samples.

Every batch is checked against the model's inputs (names, rank, static dims, dtype kind) and a
``ValueError`` names the expected inputs with their shapes and dtypes next to what was given.
Arrays of another dtype are cast to the input's when that is safe (integers or booleans for a float input,
e.g. uint8 images; floats of another precision; integers of another width), and the plan's notes say so
once; floats for an integer input, empty batches and NaN or inf values are refused.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

DEFAULT_BATCH = 32


@dataclass
class InputInfo:
    name: str
    dtype: np.dtype
    shape: list  # ints, or str / None for symbolic dims

    def describe(self) -> str:
        dims = ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"


def graph_inputs(model: onnx.ModelProto) -> list[InputInfo]:
    """The real inputs of the model (graph inputs that are not initializers, as in IR < 4 models)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype("float32")
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim] \
            if tt.HasField("shape") else None
        out.append(InputInfo(vi.name, dtype, shape))
    return out


def _expected(inputs: list[InputInfo]) -> str:
    return "; ".join(i.describe() for i in inputs)


def _to_numpy(v):
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "detach") and hasattr(v, "cpu"):  # torch tensor
        return v.detach().cpu().numpy()
    return np.asarray(v)


def check_feed(feed, inputs: list[InputInfo], where: str, notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """Validate one batch; returns the feed as numpy arrays of the inputs' dtypes.

    Refused: wrong names, ranks or static dims, a dtype that cannot be cast safely (floats for an integer
    input), an empty batch, NaN or inf in a floating-point input.  Cast (and said once in ``notes``):
    integers or booleans for a floating-point input (e.g. uint8 images), floats of another precision,
    integers of another width."""
    if not isinstance(feed, Mapping):
        if len(inputs) == 1 and (isinstance(feed, np.ndarray) or hasattr(feed, "detach")):
            feed = {inputs[0].name: feed}
        else:
            raise ValueError(f"{where}: expected a feed dict {{input name: array}}, got {type(feed).__name__}; the "
                             f"model's inputs are {_expected(inputs)}")
    names = {i.name for i in inputs}
    given = {str(k): _to_numpy(v) for k, v in feed.items()}
    missing, extra = names - set(given), set(given) - names
    if missing or extra:
        got = "; ".join(f"{k}: {v.dtype} {list(v.shape)}" for k, v in given.items())
        raise ValueError(f"{where}: wrong input names (missing {sorted(missing)}, unexpected {sorted(extra)}); "
                         f"the model expects {_expected(inputs)}; got {got or 'nothing'}")
    out = {}
    for info in inputs:
        a = given[info.name]
        if info.shape is not None:
            bad = a.ndim != len(info.shape) or any(isinstance(d, int) and d > 0 and d != s
                                                   for d, s in zip(info.shape, a.shape))
            if bad:
                raise ValueError(f"{where}: input {info.name!r} has shape {list(a.shape)}, the model expects "
                                 f"{info.describe()} (all inputs: {_expected(inputs)})")
        if a.ndim and a.shape[0] == 0:
            raise ValueError(f"{where}: input {info.name!r} is empty (shape {list(a.shape)}: no samples)")
        if a.dtype != info.dtype:
            safe = (info.dtype.kind == "f" and a.dtype.kind in "fiub") or (
                info.dtype.kind in "iu" and a.dtype.kind in "iub") or (info.dtype.kind == "b" and a.dtype.kind == "b")
            if not safe:
                raise ValueError(f"{where}: input {info.name!r} has dtype {a.dtype}, the model expects "
                                 f"{info.describe()}; a cast from {a.dtype} would change the values")
            note = f"calibration input {info.name!r} given as {a.dtype}, cast to {info.dtype}"
            if notes is not None and note not in notes:
                notes.append(note)
            a = a.astype(info.dtype)
        if a.dtype.kind == "f":
            bad = int(a.size - np.isfinite(a).sum())
            if bad:
                raise ValueError(f"{where}: input {info.name!r} has {bad:,} NaN or inf value(s) of {a.size:,}; "
                                 "calibration data must be finite")
        out[info.name] = np.ascontiguousarray(a)
    return out


def iter_feeds(calib, inputs: list[InputInfo], batch_size: int | None = None,
               max_batches: int | None = None, notes: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Validated feed dicts, one batch at a time (see module docstring)."""
    if calib is None:
        return
    bs = int(batch_size or DEFAULT_BATCH)
    if bs < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(calib, (str, os.PathLike)):
        yield from _npz(os.fspath(calib), inputs, bs, max_batches, notes)
        return
    if isinstance(calib, Mapping) or isinstance(calib, np.ndarray) or hasattr(calib, "detach"):
        calib = [calib]
    if not hasattr(calib, "__iter__"):
        raise TypeError(f"calib must be an iterable of feed dicts, a feed dict or an .npz path; got "
                        f"{type(calib).__name__}")
    for i, feed in enumerate(calib):
        if max_batches is not None and i >= max_batches:
            return
        yield check_feed(feed, inputs, f"calibration batch {i}", notes)


def _npz(path: str, inputs: list[InputInfo], bs: int, max_batches: int | None, notes: list[str] | None = None):
    if not os.path.exists(path):
        raise ValueError(f"calibration file {path!r} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"calibration file {path!r} is not a readable .npz ({type(exc).__name__}: {exc})") from None
    if not hasattr(data, "files"):
        raise ValueError(f"calibration file {path!r} is a single array, not an .npz with one array per input "
                         f"({_expected(inputs)})")
    with data:
        arrays = {k: data[k] for k in data.files}
    lengths = {k: len(v) if v.ndim else 1 for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"calibration file {path!r}: arrays have different lengths along axis 0 ({lengths})")
    n = next(iter(lengths.values()), 0)
    if not arrays or n == 0:
        raise ValueError(f"calibration file {path!r} holds no samples (arrays: "
                         f"{', '.join(f'{k} {list(v.shape)}' for k, v in arrays.items()) or 'none'})")
    for b, s in enumerate(range(0, n, bs)):
        if max_batches is not None and b >= max_batches:
            return
        yield check_feed({k: v[s:s + bs] for k, v in arrays.items()}, inputs, f"{path!r} batch {b}", notes)


def feed_size(feed: dict[str, np.ndarray]) -> int:
    """Samples in a batch: the leading dim of its first input (1 for scalars)."""
    for a in feed.values():
        return int(a.shape[0]) if a.ndim else 1
    return 1
