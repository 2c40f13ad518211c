"""Frontend-agnostic planning: layers with their weights, Grams and sensitivities in, a :class:`Plan` out.

Both frontends (torch.fx in :mod:`sketchpass.fx`, ONNX in :mod:`sketchpass.onnx`) find their layers,
observe them on calibration data, and hand this module one :class:`PlanLayer` per layer.  Here the
user's ``ignore``/``overrides`` are applied (precedence: global < op type < name glob < exact name),
candidate forms are built with their predicted errors (:mod:`sketchpass.candidates`) and the budget
solver (:func:`sketchpass.budget.solve`) picks one form per layer.  Nothing here imports torch.fx or onnx.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .budget import Budget, Candidate, InfeasibleBudgetError, solve
from .calib import GramAccumulator
from .candidates import Form, form_error, sketch_forms, svd_forms, weighted_groups
from .plan import Decision, LayerPlan, LayerSpec, Plan
from .report import progress_bar
from .sketch.random import DISTRIBUTIONS

METHODS = ("auto", "sketch", "svd")
INIT_CHOICES = ("auto", "calibrated", "lstsq", "sketch", "random")
OPTION_KEYS = {"l", "granularity", "init", "dist", "max_batches", "capture", "shrink", "sensitivity_samples",
               "probes", "example_inputs", "sketch_sizes", "progress"}
OPTION_DEFAULTS = {"l": 1, "granularity": 8, "init": "auto", "dist": "rademacher", "max_batches": None,
                   "capture": "auto", "shrink": "auto", "sensitivity_samples": 16, "probes": 1,
                   "example_inputs": None, "sketch_sizes": None, "progress": None}


@dataclass
class PlanLayer:
    """One layer as a frontend sees it.

    ``weight``: the dense weight in torch layout (``(d_out, d_in)`` or ``(d_out, d_in/g, *kernel)``);
    ``gram``: its input-Gram accumulator (``None`` = data-free); ``sensitivity``: the output gain of
    its relative error (1.0 when unmeasured); ``skip``: why it cannot be factored (``None`` = it can);
    ``kind``: the frontend's type name (``"Linear"``, ``"Conv2d"``, ``"Gemm"``...), matched by
    ``ignore``/``overrides`` rules as an op type."""

    spec: LayerSpec
    weight: torch.Tensor | None = None
    gram: GramAccumulator | None = None
    sensitivity: float = 1.0
    skip: str | None = None
    kind: str = ""
    extra: dict = field(default_factory=dict)


def check_options(method: str, seed: int, opts: dict, known: set[str] = OPTION_KEYS) -> dict:
    """Validate ``plan`` options at the edge: unknown keys and bad values are errors."""
    unknown = set(opts) - known
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    o = dict(OPTION_DEFAULTS)
    o.update(opts)
    if not isinstance(o["l"], int) or o["l"] < 1:
        raise ValueError(f"l must be a positive int, got {o['l']!r}")
    if not isinstance(o["granularity"], int) or o["granularity"] < 1:
        raise ValueError(f"granularity must be a positive int, got {o['granularity']!r}")
    if o["init"] not in INIT_CHOICES:
        raise ValueError(f"init must be one of {INIT_CHOICES}, got {o['init']!r}")
    if o["dist"] not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {o['dist']!r}")
    if o["shrink"] != "auto" and not (isinstance(o["shrink"], (int, float)) and 0 <= o["shrink"] <= 1):
        raise ValueError(f"shrink must be 'auto' or a number in [0, 1], got {o['shrink']!r}")
    return o


def match_rule(spec: LayerSpec, pattern: str, kind: str) -> int:
    """Precedence of a rule matching this layer: 3 exact name, 2 name glob, 1 op type, 0 none."""
    if pattern == spec.name:
        return 3
    if pattern.lower() in (spec.op, kind.lower()):
        return 1
    if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(spec.name, pattern):
        return 2
    return 0


def resolve_override(spec: LayerSpec, kind: str, overrides: dict):
    """The override of highest precedence (global < op type < name glob < exact name), or ``...``."""
    best, best_p = ..., -1
    for pattern, value in overrides.items():
        p = match_rule(spec, pattern, kind)
        if p > best_p and p > 0:
            best, best_p = value, p
    return best


def override_form(spec: LayerSpec, value, method: str, l: int) -> tuple[str, int]:
    """``value``: None (dense), an int (size for the plan's method; svd for 'auto'), or a dict
    ``{"method": "svd", "rank": r}`` / ``{"method": "sketch", "k": k, "l": l}``."""
    if isinstance(value, bool):
        raise TypeError(f"override for {spec.name!r}: expected None, an int size or a dict, got {value!r}")
    if isinstance(value, int):
        return ("sketch" if method == "sketch" else "svd"), value
    if isinstance(value, dict):
        unknown = set(value) - {"method", "rank", "k", "l"}
        if unknown:
            raise ValueError(f"override for {spec.name!r}: unknown keys {sorted(unknown)}")
        m = value.get("method", "sketch" if "k" in value else "svd")
        if m == "svd":
            return "svd", int(value["rank"])
        if m == "sketch":
            return "sketch", int(value["k"]) * int(value.get("l", l))
        raise ValueError(f"override for {spec.name!r}: method must be 'svd' or 'sketch', got {m!r}")
    raise TypeError(f"override for {spec.name!r}: expected None, an int size or a dict, got {type(value).__name__}")


def apply_ignore(layers: Iterable[PlanLayer], ignore) -> list[str]:
    """Mark layers matched by an ``ignore`` rule (name, glob or op type) as skipped; returns the rules."""
    rules = [ignore] if isinstance(ignore, str) else list(ignore or ())
    for pl in layers:
        if pl.skip is None:
            hit = next((p for p in rules if match_rule(pl.spec, p, pl.kind)), None)
            if hit is not None:
                pl.skip = f"ignored by user ({hit!r})"
    return rules


def fit_init_of(init: str, has_calib: bool) -> str:
    """The init whose errors size the layers: calibrated with data, lstsq without (``init="auto"``).

    ``init="random"`` (training from scratch) sizes the layers the same way: the layers are built with
    fresh factors, but how well a form of each size can represent the given weights on the given
    data is still the best measure of the capacity that layer needs."""
    if init in ("auto", "calibrated", "random"):
        return "calibrated" if has_calib else "lstsq"
    return init


def decision_of(spec: LayerSpec, f: Form, l: int, reason: str | None = None) -> Decision:
    if f.method == "svd":
        return Decision("svd", rank=f.size, params=f.params, macs=f.macs, predicted_error=f.error, reason=reason)
    return Decision("sketch", k=f.size // l, l=l, params=f.params, macs=f.macs, predicted_error=f.error, reason=reason)


def choose(layers: list[PlanLayer], budget: Budget, *, model_params: int, model_macs: int, method: str, seed: int,
           overrides: dict | None, o: dict, has_calib: bool, progress=None) -> tuple[list[LayerPlan], dict]:
    """Candidates for every free layer and the solver's choice.  Returns the layer plans and the
    ``plan.options`` entry.  Raises :class:`InfeasibleBudgetError` with the smallest achievable value."""
    overrides = dict(overrides or {})
    totals = {"params": float(model_params), "flops": float(model_macs)}
    limits = budget.limits(totals)
    units = tuple(limits)
    fit_init = fit_init_of(o["init"], has_calib)
    sketch_sizes = o["sketch_sizes"] or (4 if method == "auto" else 8)

    plans: list[LayerPlan] = []
    free: list[tuple[int, list[Form]]] = []
    with progress_bar("candidates", sum(1 for pl in layers if pl.skip is None), progress) as adv:
        for pl in layers:
            spec = pl.spec
            if pl.skip is not None:
                plans.append(LayerPlan(spec, Decision("dense", reason=pl.skip, params=spec.params, macs=spec.macs,
                                                      skipped=True), 1.0))
                continue
            w = float(pl.sensitivity)
            grams = pl.gram.shrunk(o["shrink"]) if pl.gram is not None else None
            W = pl.weight
            ov = resolve_override(spec, pl.kind, overrides)
            if ov is not ...:
                if ov is None:
                    plans.append(LayerPlan(spec, Decision("dense", reason="kept dense by override",
                                                          params=spec.params, macs=spec.macs), w))
                else:
                    m, size = override_form(spec, ov, method, o["l"])
                    if size < 1 or (m == "svd" and size > spec.max_rank()) or (m == "sketch" and size % o["l"]):
                        raise ValueError(f"override for {spec.name!r}: size {size} is not valid for {m} (rank in "
                                         f"[1, {spec.max_rank()}]; sketch m a multiple of l={o['l']})")
                    err = form_error(spec, W, grams, m, size, l=o["l"], seed=seed, dist=o["dist"], init=fit_init)
                    f = Form(m, size, spec.form_params(m, size), spec.form_macs(m, size), err)
                    plans.append(LayerPlan(spec, decision_of(spec, f, o["l"], reason="size set by override"), w))
                adv(1, spec.name)
                continue
            forms: list[Form] = []
            # the W_g C_g products, shared by the SVD spectrum and every sketch fit of the layer
            weighted = weighted_groups(spec, W, grams) if method == "auto" and grams is not None else None
            if method in ("auto", "svd"):
                forms += svd_forms(spec, W, grams, units, o["granularity"], weighted)
            if method in ("auto", "sketch"):
                forms += sketch_forms(spec, W, grams, units, o["granularity"], o["l"], seed, o["dist"], fit_init,
                                      sketch_sizes, weighted)
            plans.append(LayerPlan(spec, Decision("dense", params=spec.params, macs=spec.macs), w))
            if forms:
                free.append((len(plans) - 1, forms))
            else:
                plans[-1].decision.reason = "no factored form is cheaper than dense in the budget's units"
            adv(1, spec.name)

    # fixed cost = everything that is not a free layer
    free_idx = {i for i, _ in free}
    fixed = {"params": model_params - sum(plans[i].spec.params for i in free_idx)
             - sum(lp.spec.params - lp.decision.params for j, lp in enumerate(plans) if j not in free_idx),
             "flops": model_macs - sum(plans[i].spec.macs for i in free_idx)
             - sum(lp.spec.macs - lp.decision.macs for j, lp in enumerate(plans) if j not in free_idx)}
    cands = []
    for i, forms in free:
        lp = plans[i]
        row = [Candidate({"params": lp.spec.params, "flops": lp.spec.macs}, 0.0, None)]
        row += [Candidate({"params": f.params, "flops": f.macs}, lp.sensitivity * f.error, f) for f in forms]
        cands.append(row)
    if cands:
        try:
            choice = solve(cands, limits, fixed)
        except InfeasibleBudgetError as exc:  # add the smallest achievable value as a fraction of the model
            lows = {u: fixed[u] + sum(min(c.cost[u] for c in row) for row in cands) for u in units}
            fr = ", ".join(f"{u}={lows[u] / totals[u]:.4f}" for u in units if totals[u] and lows[u] > limits[u])
            msg = f"{exc}; as a fraction of the model the smallest achievable is {fr}" if fr else str(exc)
            if o["granularity"] > 1:
                msg += (f" (the smallest candidate sizes are on a grid of granularity={o['granularity']}; a smaller "
                        "granularity= adds smaller sizes)")
            raise InfeasibleBudgetError(msg) from None
    else:
        choice = []
        for u in units:
            if fixed[u] > limits[u] * (1 + 1e-12):
                raise InfeasibleBudgetError(f"the {u} budget {limits[u]:,.0f} cannot be met: no layer can be "
                                            f"factored, the model stays at {fixed[u]:,.0f}")
    for (i, _), c, row in zip(free, choice, cands):
        f = row[c].tag
        if f is None:
            plans[i].decision.reason = "kept dense by the solver"
        else:
            plans[i].decision = decision_of(plans[i].spec, f, o["l"])
    options = {"l": o["l"], "granularity": o["granularity"], "init": o["init"], "dist": o["dist"],
               "shrink": o["shrink"], "fit_init": fit_init}
    return plans, options


def make_plan(layers: list[LayerPlan], options: dict, *, budget: Budget, method: str, seed: int, frontend: str,
              capture: str, calib: dict | None, notes: list[str], model_params: int, model_macs: int) -> Plan:
    p = Plan(layers=layers, budget=budget.to_dict(), method=method, seed=seed, frontend=frontend, capture=capture,
             calib=calib, notes=notes, options=options)
    p.recompute_totals(model_params, model_macs)
    return p
