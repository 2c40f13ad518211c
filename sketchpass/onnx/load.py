"""Reading and writing ONNX files: external data, clear errors, atomic writes.

* :func:`load` — a ``ModelProto`` (copied, so the caller's object is never modified) or a path; external
  data is loaded with the model (``onnx.load(path, load_external_data=True)``).
* :func:`save` — writes through a temporary file in the destination folder and ``os.replace``, so a
  failed write never leaves a half-written file and never touches an existing one.  Models whose
  serialised size would exceed protobuf's 2 GB limit are written with external data (one ``.data``
  file next to the ``.onnx``, named after it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ..store import default_mode

PROTO_LIMIT = 2**31 - 1  # protobuf cannot serialise a message of 2 GiB or more
EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the external data file


def load(model, *, copy: bool = True) -> onnx.ModelProto:
    """``model`` as a ``ModelProto``: a path is read (with its external data), a ``ModelProto`` is copied
    (``copy=False``: returned as is — the caller promises not to modify it).

    Raises ``ValueError`` naming the file when it is missing, not an ONNX model, or corrupt."""
    if isinstance(model, onnx.ModelProto):
        if not copy:
            return model
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"expected an onnx.ModelProto or a path to an .onnx file, got {type(model).__name__}")
    path = Path(model)
    if not path.exists():
        raise ValueError(f"ONNX file {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory, not an ONNX file")
    try:
        m = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, onnx.checker.ValidationError) as exc:  # not a ModelProto
        raise ValueError(f"{str(path)!r} is not a valid ONNX model (could not parse it: "
                         f"{type(exc).__name__}: {exc})") from None
    missing = sorted({loc for loc in _external_locations(m) if not (path.parent / loc).is_file()})
    if missing:
        raise ValueError(f"ONNX file {str(path)!r} keeps its weights in external data file(s) {', '.join(missing)}, "
                         f"which are missing from {str(path.parent)!r}; keep the data file(s) next to the model")
    try:
        onnx.load_external_data_for_model(m, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ValueError(f"ONNX file {str(path)!r}: its external data could not be read ({exc})") from None
    if not m.HasField("graph") or (not m.graph.node and not m.graph.output):
        raise ValueError(f"{str(path)!r} is not a valid ONNX model (no graph in it)")
    return m


def _external_locations(model: onnx.ModelProto) -> list[str]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    out = []
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            out += [e.value for e in t.external_data if e.key == "location"]
    return out


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all tensor data held in the model (initializers and Constant-node values, any graph)."""
    total = 0

    def walk(g: onnx.GraphProto):
        nonlocal total
        for t in g.initializer:
            total += _nbytes(t)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    total += _nbytes(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        walk(sg)

    walk(model.graph)
    return total


def _nbytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= d
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 4
    return n * itemsize


def needs_external(model: onnx.ModelProto) -> bool:
    """Whether the model is too large for a single protobuf file (with a margin for the graph itself)."""
    return tensor_bytes(model) > PROTO_LIMIT - 64 * 2**20


def save(model: onnx.ModelProto, path, *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically; returns the path.

    ``external_data=None`` (default) uses external data only when the model exceeds 2 GB; ``True``
    forces it (tensors of ≥ 1 KiB go to ``<name>.data`` beside the file).  The model object is not
    modified (external data is written from a copy)."""
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"save expects an onnx.ModelProto, got {type(model).__name__}")
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist")
    ext = needs_external(model) if external_data is None else bool(external_data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    data_name = f"{path.name}.data"
    tmp_data = None
    try:
        if ext:
            m = onnx.ModelProto()
            m.CopyFrom(model)
            tmp_data = folder / f".{data_name}.{os.getpid()}.tmp"
            # the location recorded in the model is the final data file name; we write to a temp name
            # and rename it after the model file is complete
            onnx.external_data_helper.convert_model_to_external_data(
                m, all_tensors_to_one_file=True, location=data_name, size_threshold=EXTERNAL_THRESHOLD)
            _write_external(m, folder, tmp_data)
            with open(tmp, "wb") as f:
                f.write(m.SerializeToString())
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        default_mode(tmp)
        if tmp_data is not None:
            default_mode(tmp_data)
            os.replace(tmp_data, folder / data_name)
        os.replace(tmp, path)
    except BaseException as exc:
        for p in (tmp, tmp_data):
            if p is not None and os.path.exists(p):
                os.unlink(p)
        if isinstance(exc, OSError) and not exc.filename:  # a failed write: say which file
            raise OSError(exc.errno, f"cannot write {str(path)!r} ({exc.strerror or exc}); nothing was written") \
                from None
        raise
    return path


def _write_external(m: onnx.ModelProto, folder: Path, data_path: Path) -> None:
    """Write the raw data of every tensor marked external into ``data_path`` (offsets filled in)."""
    from onnx.external_data_helper import _get_all_tensors, set_external_data, uses_external_data

    with open(data_path, "wb") as f:
        for t in _get_all_tensors(m):
            if not uses_external_data(t) or not t.HasField("raw_data"):
                continue
            offset = f.tell()
            pad = (-offset) % 4096  # page-aligned, as onnx does
            if pad:
                f.write(b"\0" * pad)
                offset += pad
            f.write(t.raw_data)
            location = next(e.value for e in t.external_data if e.key == "location")
            set_external_data(t, location=location, offset=offset, length=len(t.raw_data))
            t.ClearField("raw_data")
