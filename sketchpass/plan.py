"""The plan: what sketchpass decided for every layer, as versioned JSON (DESIGN §2).

A :class:`Plan` is produced by :func:`sketchpass.plan` and consumed by :func:`sketchpass.apply`.  It
names layers by their module path (``"features.3"``, ``"encoder.layer.0.attention.self.query"``), so
a plan made on a PyTorch model applies to the same model exported to ONNX.  Nothing here imports
torch.fx, onnx or onnx-graphsurgeon.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .sketch import cost
from .sketch.random import GENERATOR_ID

PLAN_VERSION = 1
METHODS = ("dense", "sketch", "svd")


@dataclass
class LayerSpec:
    """A weight-carrying layer found in a model, in the terms of the math (one entry per layer).

    ``op`` is ``"linear"`` (``nn.Linear``, ``F.linear``, ``Gemm``, matmul with a weight),
    ``"conv1d"`` or ``"conv2d"``.  ``p_in``/``p_out`` are input/output positions per sample at the
    calibration (or example) shape; 0 when unknown.
    """

    name: str
    op: str
    d_in: int
    d_out: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: Any = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = False
    p_in: int = 0
    p_out: int = 0
    source: str = "module"  # module | function | matmul | onnx

    @property
    def hw(self) -> int:
        return math.prod(self.kernel) if self.kernel else 1

    @property
    def params(self) -> int:
        return cost.dense_params(self.d_out, self.d_in, self.hw, self.groups, self.bias)

    @property
    def macs(self) -> int:
        return cost.dense_macs(self.d_out, self.d_in, self.hw, self.groups, max(self.p_out, 1))

    def form_params(self, method: str, size: int) -> int:
        if method == "sketch":
            return cost.sketch_params(self.d_out, self.d_in, size, self.hw, self.groups, self.bias)
        if method == "svd":
            return cost.svd_params(self.d_out, self.d_in, size, self.hw, self.groups, self.bias)
        return self.params

    def form_macs(self, method: str, size: int) -> int:
        p_in, p_out = max(self.p_in, 1), max(self.p_out, 1)
        if method == "sketch":
            return cost.sketch_macs(self.d_out, self.d_in, size, self.hw, self.groups, p_in, p_out)
        if method == "svd":
            return cost.svd_macs(self.d_out, self.d_in, size, self.hw, self.groups, p_out)
        return self.macs

    def max_rank(self) -> int:
        return min(self.d_out // self.groups, self.d_in // self.groups * self.hw)


@dataclass
class Decision:
    """What happens to one layer.  ``method="dense"`` keeps it; ``reason`` says why (always set for
    dense: skipped as unsupported, ignored by the user, overridden, or kept by the solver)."""

    method: str = "dense"
    k: int | None = None
    l: int | None = None
    rank: int | None = None
    reason: str | None = None
    params: int = 0
    macs: int = 0
    predicted_error: float = 0.0
    measured_error: float | None = None
    skipped: bool = False  # True when the layer cannot be factored at all (reason says why)

    @property
    def size(self) -> int | None:
        """``m = k l`` for sketch, ``rank`` for svd."""
        if self.method == "sketch":
            return self.k * self.l
        return self.rank if self.method == "svd" else None


@dataclass
class LayerPlan:
    spec: LayerSpec
    decision: Decision
    sensitivity: float = 1.0


@dataclass
class Plan:
    """The whole plan.  ``totals`` hold the whole model's params/MACs before and after."""

    layers: list[LayerPlan]
    budget: dict
    method: str = "auto"
    seed: int = 0
    generator: str = GENERATOR_ID
    frontend: str = "torch"
    capture: str = "fx"
    calib: dict | None = None
    totals: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    version: int = PLAN_VERSION

    # ---------------------------------------------------------------- lookup
    def __getitem__(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.spec.name == name:
                return lp
        raise KeyError(f"no layer named {name!r} in this plan (layers: {', '.join(self.names()[:8])}...)")

    def names(self) -> list[str]:
        return [lp.spec.name for lp in self.layers]

    # ---------------------------------------------------------------- totals
    def recompute_totals(self, model_params: int, model_macs: int) -> None:
        """Fill ``totals`` from the decisions: non-factorable parts of the model stay as they are."""
        p_layers = sum(lp.spec.params for lp in self.layers)
        m_layers = sum(lp.spec.macs for lp in self.layers)
        p_after = sum(lp.decision.params for lp in self.layers)
        m_after = sum(lp.decision.macs for lp in self.layers)
        self.totals = {
            "params_before": int(model_params),
            "params_after": int(model_params - p_layers + p_after),
            "macs_before": int(model_macs),
            "macs_after": int(model_macs - m_layers + m_after),
            "predicted_output_error": float(sum(lp.sensitivity * lp.decision.predicted_error for lp in self.layers)),
        }

    def achieved(self) -> dict:
        """Achieved fractions of the whole model, next to what was requested."""
        t = self.totals
        out = {}
        if t.get("params_before"):
            out["params"] = t["params_after"] / t["params_before"]
        if t.get("macs_before"):
            out["flops"] = t["macs_after"] / t["macs_before"]
        return out

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = "sketchpass.plan"
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if d.get("format") != "sketchpass.plan":
            raise ValueError("not a sketchpass plan: the JSON has no 'format': 'sketchpass.plan' entry")
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')} is not supported by this sketchpass (expects "
                             f"{PLAN_VERSION}); re-run sketchpass.plan with this version")
        if d.get("generator") != GENERATOR_ID:
            raise ValueError(f"plan uses sketch generator {d.get('generator')!r}, this sketchpass has "
                             f"{GENERATOR_ID!r}; the sketches would differ")
        layers = []
        for ld in d["layers"]:
            spec = dict(ld["spec"])
            for key in ("kernel", "stride", "dilation"):
                spec[key] = tuple(spec[key])
            if isinstance(spec["padding"], list):
                spec["padding"] = tuple(spec["padding"])
            layers.append(LayerPlan(LayerSpec(**spec), Decision(**ld["decision"]), ld.get("sensitivity", 1.0)))
        kw = {k: d[k] for k in ("budget", "method", "seed", "generator", "frontend", "capture", "calib", "totals",
                                "notes", "options", "version") if k in d}
        return cls(layers=layers, **kw)

    @classmethod
    def from_json(cls, s: str) -> Plan:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan JSON is not valid JSON: {exc}") from None
        return cls.from_dict(d)

    # ---------------------------------------------------------------- report
    def report(self, width: int | None = 140) -> str:
        """A per-layer table and a summary (requested vs achieved budget), as text."""
        from .report import render_plan

        return render_plan(self, width=width)

    def __str__(self) -> str:
        return self.report()
