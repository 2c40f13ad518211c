"""The ONNX frontend: ONNX in, ONNX out (DESIGN §2–3).

    import sketchpass.onnx as spx
    small = spx.transform("model.onnx", sp.Budget(params=0.5), calib="calib.npz")
    spx.save(small, "small.onnx")

``plan`` / ``apply`` / ``transform`` take an ``onnx.ModelProto`` or a path and share the planner, solver
and fits of the torch pass; ``load`` / ``save`` read and write models (external data for > 2 GB,
atomic writes, clear errors).  Importing :mod:`sketchpass` does not import this package.
"""

from .emit import U_STORAGE
from .load import load, save
from .match import REASONS, Site, find_sites
from .pipeline import PLAN_KEY, apply, plan, transform, verify


def plan_of(model):
    """The plan stored in a model emitted by :func:`apply` (``None`` if it has none)."""
    from ..plan import Plan

    m = load(model, copy=False)
    for e in m.metadata_props:
        if e.key == PLAN_KEY:
            return Plan.from_json(e.value)
    return None


__all__ = ["PLAN_KEY", "REASONS", "Site", "U_STORAGE", "apply", "find_sites", "load", "plan", "plan_of", "save",
           "transform", "verify"]
