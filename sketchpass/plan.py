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
from enum import Enum
from typing import Any

from .sketch import cost
from .sketch.random import GENERATOR_ID

PLAN_VERSION = 2
READS = (1, 2)  # plan versions this sketchpass reads (version 1: free-text skip reasons, no verify record)
METHODS = ("dense", "sketch", "svd")


class SkipReason(str, Enum):
    """Why a layer is dense.  Two families:

    * the layer cannot be factored (``factorable`` is False): the op, its weight or its geometry is not
      supported — a plan can never factor it in this model;
    * the layer could be factored but is kept dense (``factorable`` is True): the user said so, it did
      not run on the calibration data, no factored form is cheaper, or the solver preferred dense.

    ``Decision.reason`` carries the detail text (which rule, which other layer shares the weight, ...)."""

    UNSUPPORTED_OP = "unsupported-op"  # ConvTranspose, Conv3d, LazyLinear, ...
    DEPTHWISE = "depthwise"  # one input channel per group: nothing to factor
    PADDING = "padding"  # padding_mode other than zeros, asymmetric 'same'
    SHARED_WEIGHT = "shared-weight"  # tied weights
    ATTENTION_INTERNAL = "attention-internal"  # nn.MultiheadAttention reads its projection weights directly
    FUNCTIONAL = "functional"  # a functional use with computed bias or geometry, or W @ x in torch
    RUNTIME_WEIGHT = "runtime-weight"  # the weight depends on graph inputs or random ops
    LEFT_WEIGHT = "left-weight"  # constant on the left of a MatMul (W @ x)
    WEIGHT_RANK = "weight-rank"  # an N-D constant MatMul operand
    SUBGRAPH = "subgraph"  # inside If / Loop / Scan
    NOT_FLOAT = "not-float"
    UNSUPPORTED_DTYPE = "unsupported-dtype"  # e.g. bfloat16 weights in an ONNX graph
    QUANTIZED = "quantized"
    SHAPE_MISMATCH = "shape-mismatch"
    IGNORED = "ignored"  # by the user's ignore= rules
    NOT_EXECUTED = "not-executed"  # never ran on the calibration data
    OVERRIDE = "override"  # overrides= set it dense
    NOT_CHEAPER = "not-cheaper"  # no factored form is cheaper than dense in the budget's units
    SOLVER = "solver"  # the solver kept it dense

    @property
    def factorable(self) -> bool:
        return self in _FACTORABLE


_FACTORABLE = {SkipReason.IGNORED, SkipReason.NOT_EXECUTED, SkipReason.OVERRIDE, SkipReason.NOT_CHEAPER,
               SkipReason.SOLVER}

# version-1 plans stored only the text; these prefixes map it back (reading old plans only)
_V1_PREFIXES = (
    ("ignored by user", SkipReason.IGNORED), ("not executed", SkipReason.NOT_EXECUTED),
    ("kept dense by override", SkipReason.OVERRIDE), ("no factored form", SkipReason.NOT_CHEAPER),
    ("kept dense by the solver", SkipReason.SOLVER), ("depthwise", SkipReason.DEPTHWISE),
    ("padding", SkipReason.PADDING), ("weight is shared", SkipReason.SHARED_WEIGHT),
    ("used inside nn.MultiheadAttention", SkipReason.ATTENTION_INTERNAL),
    ("weight is computed at run time", SkipReason.RUNTIME_WEIGHT),
    ("constant weight on the left", SkipReason.LEFT_WEIGHT), ("constant weight is", SkipReason.WEIGHT_RANK),
    ("inside a subgraph", SkipReason.SUBGRAPH), ("weight is not floating point", SkipReason.NOT_FLOAT),
    ("weight is missing", SkipReason.NOT_FLOAT), ("quantized weight", SkipReason.QUANTIZED),
    ("weight shape does not match", SkipReason.SHAPE_MISMATCH), ("matmul", SkipReason.FUNCTIONAL),
    ("F.linear", SkipReason.FUNCTIONAL), ("functional", SkipReason.FUNCTIONAL),
)


def skip_from_v1(reason: str | None, skipped: bool) -> SkipReason | None:
    """The :class:`SkipReason` of a version-1 decision (text only)."""
    if not reason:
        return None
    for prefix, value in _V1_PREFIXES:
        if reason.startswith(prefix):
            return value
    return SkipReason.UNSUPPORTED_OP if skipped else SkipReason.SOLVER


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
    """What happens to one layer.  ``method="dense"`` keeps it; ``skip`` says why (always set for dense)
    and ``reason`` gives the detail.  ``predicted_error`` is the layer's relative output error predicted
    on the calibration Grams; ``measured_error`` the one measured in the compressed model (on held-out
    calibration batches, including what the compressed layers before it changed)."""

    method: str = "dense"
    k: int | None = None
    l: int | None = None
    rank: int | None = None
    reason: str | None = None
    params: int = 0
    macs: int = 0
    predicted_error: float = 0.0
    measured_error: float | None = None
    skip: SkipReason | None = None
    ms: float | None = None  # the form's time measured standalone on the target (latency budgets)

    def __post_init__(self):
        if self.skip is not None and not isinstance(self.skip, SkipReason):
            self.skip = SkipReason(self.skip)

    @property
    def skipped(self) -> bool:
        """True when the layer cannot be factored at all (``reason`` says why)."""
        return self.skip is not None and not self.skip.factorable

    @property
    def size(self) -> int | None:
        """``m = k l`` for sketch, ``rank`` for svd."""
        if self.method == "sketch":
            return self.k * self.l
        return self.rank if self.method == "svd" else None


@dataclass
class LayerPlan:
    """One layer: its spec, the decision and what the solver weighed it by.

    ``sensitivity`` is the estimated output gain of the layer's relative error; ``correction`` the factor
    the verify loop applied to it after measuring (1.0 until then), so the solver's weight is their
    product; ``measured_output_error`` is the model's relative output error with this layer alone
    compressed (measured by the verify loop when it attributes the model's error to layers)."""

    spec: LayerSpec
    decision: Decision
    sensitivity: float = 1.0
    correction: float = 1.0
    measured_output_error: float | None = None
    dense_ms: float | None = None  # the dense layer's time measured standalone on the target

    @property
    def weight(self) -> float:
        return self.sensitivity * self.correction


@dataclass
class Plan:
    """The whole plan.  ``totals`` hold the whole model's params/MACs before and after and the predicted
    (and, with calibration data, measured) relative output error; ``verify`` what the verify stage measured
    in every round of the closed loop."""

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
    verify: dict | None = None
    latency: dict | None = None  # target, threads, input shapes, dense and compressed ms with spread, rounds
    timings: dict | None = None  # wall seconds of each stage of the pass that made it (all rounds summed)
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
    def predicted_output_error(self) -> float:
        """``Σ_i w_i e_i``: the solver's objective, the predicted relative squared output error."""
        return float(sum(lp.weight * lp.decision.predicted_error for lp in self.layers))

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
            "predicted_output_error": self.predicted_output_error(),
            "measured_output_error": None,
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
        for ld in d["layers"]:
            sk = ld["decision"]["skip"]
            ld["decision"]["skip"] = None if sk is None else SkipReason(sk).value
        d["format"] = "sketchpass.plan"
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if not isinstance(d, dict) or d.get("format") != "sketchpass.plan":
            raise ValueError("not a sketchpass plan: the JSON has no 'format': 'sketchpass.plan' entry")
        version = d.get("version")
        if version not in READS:
            raise ValueError(f"plan version {version} is not supported by this sketchpass (reads versions "
                             f"{', '.join(map(str, READS))}); re-run sketchpass.plan with this version")
        if d.get("generator") != GENERATOR_ID:
            raise ValueError(f"plan uses sketch generator {d.get('generator')!r}, this sketchpass has "
                             f"{GENERATOR_ID!r}; the sketches would differ")
        layers = []
        try:
            for ld in d["layers"]:
                spec = dict(ld["spec"])
                for key in ("kernel", "stride", "dilation"):
                    spec[key] = tuple(spec[key])
                if isinstance(spec["padding"], list):
                    spec["padding"] = tuple(spec["padding"])
                dec = dict(ld["decision"])
                if version == 1:
                    skipped = bool(dec.pop("skipped", False))
                    if dec.get("method", "dense") == "dense":
                        dec["skip"] = skip_from_v1(dec.get("reason"), skipped)
                else:
                    dec.pop("skipped", None)
                layers.append(LayerPlan(LayerSpec(**spec), Decision(**dec), ld.get("sensitivity", 1.0),
                                        ld.get("correction", 1.0), ld.get("measured_output_error"),
                                        ld.get("dense_ms")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"plan JSON is malformed: a layer entry is invalid ({type(exc).__name__}: {exc})") \
                from None
        kw = {k: d[k] for k in ("budget", "method", "seed", "generator", "frontend", "capture", "calib", "totals",
                                "notes", "options", "verify", "latency", "timings") if k in d}
        p = cls(layers=layers, **kw)
        p.version = PLAN_VERSION
        return p

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
