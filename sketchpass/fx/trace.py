"""Capture a PyTorch model for the pass: a torch.fx ``GraphModule`` when symbolic tracing works, else
a deep copy of the model whose layers are swapped by name (said in the plan).

The input model is never modified: tracing copies parameters by reference, so we trace a deep copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch.fx
from torch import nn


@dataclass
class Captured:
    """The working copy the pass calibrates and rewrites."""

    model: nn.Module  # a GraphModule (capture == "fx") or a deep copy of the input ("modules")
    capture: str  # "fx" | "modules"
    notes: list[str] = field(default_factory=list)

    @property
    def graph(self) -> torch.fx.Graph | None:
        return self.model.graph if isinstance(self.model, torch.fx.GraphModule) else None


def capture(model: nn.Module, mode: str = "auto") -> Captured:
    """``mode``: ``"auto"`` (fx, falling back to modules), ``"fx"`` (fail if it cannot trace) or
    ``"modules"``."""
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
    return Captured(gm, "fx")
