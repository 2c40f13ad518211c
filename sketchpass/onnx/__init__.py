"""The ONNX frontend: ONNX in, ONNX out (DESIGN §2–3).

    import sketchpass.onnx as spx
    small = spx.transform("model.onnx", sp.Budget(params=0.5), calib="calib.npz")
    spx.save(small, "small.onnx")

``plan`` / ``apply`` / ``transform`` are :func:`sketchpass.plan` / ``apply`` / ``transform`` for an
``onnx.ModelProto`` or a path (the same pipeline, options and defaults as for PyTorch models, see
:mod:`sketchpass.pipeline`); ``load`` / ``save`` read and write models (external data for > 2 GB, atomic
writes, clear errors).  Importing :mod:`sketchpass` does not import this package.
"""

from ..api import apply, plan, transform
from ..options import U_STORAGE
from .frontend import PLAN_KEY, OnnxFrontend, verify
from .load import load, save
from .match import find_sites


def plan_of(model):
    """The plan stored in a model emitted by :func:`apply` (``None`` if it has none)."""
    from ..plan import Plan

    m = load(model, copy=False)
    for e in m.metadata_props:
        if e.key == PLAN_KEY:
            return Plan.from_json(e.value)
    return None


__all__ = ["PLAN_KEY", "OnnxFrontend", "U_STORAGE", "apply", "find_sites", "load", "plan", "plan_of", "save",
           "transform", "verify"]
