"""Capture a PyTorch model for the pass: a torch.fx ``GraphModule`` when symbolic tracing works, else
a deep copy of the model whose layers are swapped by name (said in the plan).

The input model is never modified: tracing copies parameters by reference, so we trace a deep copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from ..batches import slice_batch


@dataclass
class Captured:
    """The working copy the pass calibrates and rewrites."""

    model: nn.Module  # a GraphModule (capture == "fx") or a deep copy of the input ("modules")
    capture: str  # "fx" | "modules"
    notes: list[str] = field(default_factory=list)
    functional: bool = False  # F.linear / F.conv / matmul uses were turned into modules (needs the graph)

    @property
    def graph(self) -> torch.fx.Graph | None:
        return self.model.graph if isinstance(self.model, torch.fx.GraphModule) else None


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or (hasattr(out, "values") and callable(out.values)):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat(v)]
    return []


def _reproduces(gm: nn.Module, model: nn.Module, example) -> str | None:
    """``None`` if the traced graph gives the model's outputs on ``example``, else why not.

    fx records one path through Python control flow (``if x is None``, shape checks, ...); running it
    once against the original catches graphs that silently specialised on something else."""
    from ..batches import call_model

    try:
        with torch.no_grad():
            ref, got = _flat(call_model(model, example)), _flat(call_model(gm, example))
    except Exception as exc:  # noqa: BLE001 - any failure means the graph is unusable
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
    if len(ref) != len(got) or any(a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                                   for a, b in zip(ref, got)):
        return "its outputs differ from the model's"
    return None


def capture(model: nn.Module, mode: str = "auto", example=None) -> Captured:
    """``mode``: ``"auto"`` (fx, falling back to modules), ``"fx"`` (fail if it cannot trace) or
    ``"modules"``.  With an ``example`` batch the traced graph is checked against the model."""
    if mode not in ("auto", "fx", "modules"):
        raise ValueError(f"capture must be 'auto', 'fx' or 'modules', got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, an onnx.ModelProto or a path to an .onnx file; got "
                        f"{type(model).__name__}")
    work = copy.deepcopy(model)
    if mode == "modules":
        return Captured(work, "modules", ["capture='modules': layers swapped by name (no fx graph)"])
    if isinstance(work, torch.fx.GraphModule):
        return Captured(work, "fx")
    try:
        gm = torch.fx.symbolic_trace(work)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, NotImplementedError, ...)
        if mode == "fx":
            raise ValueError(f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}") from exc
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return Captured(work, "modules", [
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {first}); fell back to "
            "swapping nn.Linear/nn.Conv modules by name — functional F.linear/F.conv/matmul uses are not matched"])
    gm.train(work.training)
    if example is not None:
        was = work.training
        work.eval()
        gm.eval()
        why = _reproduces(gm, work, slice_batch(example, 2))  # two samples are enough to check the graph
        work.train(was)
        gm.train(was)
        if why is not None:
            if mode == "fx":
                raise ValueError(f"the torch.fx graph of {type(model).__name__} does not reproduce it on the "
                                 f"calibration data ({why})")
            return Captured(work, "modules", [
                f"the torch.fx graph of {type(model).__name__} does not reproduce it on the calibration data "
                f"({why}); fell back to swapping modules by name"])
    return Captured(gm, "fx")
