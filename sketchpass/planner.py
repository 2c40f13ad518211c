"""Frontend-agnostic planning: sites with their weights, Grams and sensitivities in, decisions out.

The pipeline (:mod:`sketchpass.pipeline`) hands this module one :class:`~sketchpass.site.Site` per layer.
Here the user's ``ignore`` / ``overrides`` are applied (one precedence: global < op type < name glob <
exact name), candidate forms are built once with their predicted errors (:mod:`sketchpass.candidates`)
and the budget solver (:func:`sketchpass.budget.solve`) picks one form per layer — again, cheaply, each
time the verify loop corrects the layers' weights.  Nothing here imports torch.fx or onnx.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

from .budget import Budget, Candidate, InfeasibleBudgetError, fmt_unit, solve
from .candidates import Form, form_error, sketch_forms, svd_forms, weighted_groups
from .options import Options
from .plan import Decision, LayerPlan, LayerSpec, Plan, SkipReason
from .progress import progress_bar
from .site import Site

OVERRIDE_KEYS = ("method", "rank", "k", "l")


# --------------------------------------------------------------------------- rules
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


def check_overrides(overrides) -> dict:
    """Validate the shape of ``overrides`` at the edge (values are checked per layer later)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise TypeError(f"overrides must be a dict {{layer name, glob or op type: size}}, got "
                        f"{type(overrides).__name__}")
    for pattern, value in overrides.items():
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"overrides: keys must be non-empty strings (layer names, globs or op types), got "
                            f"{pattern!r}")
        if isinstance(value, dict):
            unknown = set(value) - set(OVERRIDE_KEYS)
            if unknown:
                raise ValueError(f"override for {pattern!r}: unknown keys {sorted(unknown)}; known: "
                                 f"{list(OVERRIDE_KEYS)}")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"override for {pattern!r}: expected None, an int size or a dict, got {value!r}")
    return dict(overrides)


def check_ignore(ignore) -> list[str]:
    rules = [ignore] if isinstance(ignore, str) else list(ignore or ())
    bad = [r for r in rules if not isinstance(r, str) or not r]
    if bad:
        raise TypeError(f"ignore must be layer names, globs or op types (strings), got {bad[0]!r}")
    return rules


def override_form(spec: LayerSpec, value, method: str, l: int) -> tuple[str, int]:
    """``value``: None (dense), an int (size for the plan's method; svd for 'auto'), or a dict
    ``{"method": "svd", "rank": r}`` / ``{"method": "sketch", "k": k, "l": l}``."""
    if isinstance(value, bool):
        raise TypeError(f"override for {spec.name!r}: expected None, an int size or a dict, got {value!r}")
    if isinstance(value, int):
        return ("sketch" if method == "sketch" else "svd"), value
    if isinstance(value, dict):
        unknown = set(value) - set(OVERRIDE_KEYS)
        if unknown:
            raise ValueError(f"override for {spec.name!r}: unknown keys {sorted(unknown)}")
        m = value.get("method", "sketch" if "k" in value else "svd")
        try:
            if m == "svd":
                return "svd", int(value["rank"])
            if m == "sketch":
                return "sketch", int(value["k"]) * int(value.get("l", l))
        except KeyError as exc:
            raise ValueError(f"override for {spec.name!r}: method {m!r} needs {exc.args[0]!r}") from None
        raise ValueError(f"override for {spec.name!r}: method must be 'svd' or 'sketch', got {m!r}")
    raise TypeError(f"override for {spec.name!r}: expected None, an int size or a dict, got {type(value).__name__}")


def apply_ignore(sites: Iterable[Site], rules: list[str]) -> None:
    """Mark layers matched by an ``ignore`` rule (name, glob or op type) as kept dense."""
    for s in sites:
        if s.skip is None:
            hit = next((p for p in rules if match_rule(s.spec, p, s.kind)), None)
            if hit is not None:
                s.set_skip(SkipReason.IGNORED, f"ignored by user ({hit!r})")


def nothing_to_compress(sites: list[Site]) -> str | None:
    """``None`` when some layer can be factored; else one sentence counting the layers found by op type
    and why none qualifies."""
    if any(s.skip is None or s.skip.factorable for s in sites):
        return None
    if not sites:
        return "nothing to compress: the model has no Linear or Conv layer with a weight"
    by: dict[tuple[str, str], int] = {}
    for s in sites:
        by[(s.kind, s.skip.value)] = by.get((s.kind, s.skip.value), 0) + 1
    found = ", ".join(f"{c} {kind} ({why})" for (kind, why), c in sorted(by.items()))
    return f"nothing to compress: found {found}, and none of them can be factored"


def fit_init_of(init: str, has_calib: bool) -> str:
    """The init whose errors size the layers: calibrated with data, lstsq without (``init="auto"``).

    ``init="random"`` (training from scratch) sizes the layers the same way: the layers are built with
    fresh factors, but how well a form of each size can represent the given weights on the given
    data is still the best measure of the capacity that layer needs."""
    if init in ("auto", "calibrated", "random"):
        return "calibrated" if has_calib else "lstsq"
    return init


def decision_of(f: Form, l: int, reason: str | None = None) -> Decision:
    if f.method == "svd":
        return Decision("svd", rank=f.size, params=f.params, macs=f.macs, predicted_error=f.error, reason=reason)
    return Decision("sketch", k=f.size // l, l=l, params=f.params, macs=f.macs, predicted_error=f.error, reason=reason)


def dense_decision(spec: LayerSpec, skip: SkipReason, detail: str) -> Decision:
    return Decision("dense", params=spec.params, macs=spec.macs, skip=skip, reason=detail)


# --------------------------------------------------------------------------- candidates
@dataclass
class Choices:
    """One layer's options: a fixed decision (skipped, overridden) or factored forms for the solver."""

    spec: LayerSpec
    fixed: Decision | None = None
    forms: list[Form] = field(default_factory=list)
    dense_ms: float | None = None  # the dense layer's measured time (latency budgets)
    dense_spread: float | None = None


def candidates(sites: list[Site], units: tuple[str, ...], o: Options, has_calib: bool, overrides: dict,
               progress=None) -> list[Choices]:
    """Every layer's fixed decision or candidate forms, with predicted errors (computed once)."""
    fit_init = fit_init_of(o.init, has_calib)
    sketch_sizes = o.sketch_sizes or (4 if o.method == "auto" else 8)
    out: list[Choices] = []
    with progress_bar("candidates", sum(1 for s in sites if s.skip is None), progress) as adv:
        for s in sites:
            spec = s.spec
            if s.skip is not None:
                out.append(Choices(spec, dense_decision(spec, s.skip, s.detail)))
                continue
            grams = s.gram.shrunk(o.shrink) if s.gram is not None else None
            W = s.weight
            d = s.extra.get("out_scale")  # errors weighed by a per-channel scale after the layer (BatchNorm)
            ov = resolve_override(spec, s.kind, overrides)
            if ov is not ...:
                if ov is None:
                    out.append(Choices(spec, dense_decision(spec, SkipReason.OVERRIDE, "kept dense by override")))
                else:
                    m, size = override_form(spec, ov, o.method, o.l)
                    if size < 1 or (m == "svd" and size > spec.max_rank()) or (m == "sketch" and size % o.l):
                        raise ValueError(f"override for {spec.name!r}: size {size} is not valid for {m} (rank in "
                                         f"[1, {spec.max_rank()}]; sketch m a multiple of l={o.l})")
                    err = form_error(spec, W, grams, m, size, l=o.l, seed=o.seed, dist=o.dist, init=fit_init,
                                     out_scale=d)
                    f = Form(m, size, spec.form_params(m, size), spec.form_macs(m, size), err)
                    out.append(Choices(spec, decision_of(f, o.l, reason="size set by override")))
                adv(1, spec.name)
                continue
            forms: list[Form] = []
            # the W_g C_g products, shared by the SVD spectrum and every sketch fit of the layer
            weighted = weighted_groups(spec, W, grams, d) if o.method == "auto" and grams is not None else None
            if o.method in ("auto", "svd"):
                forms += svd_forms(spec, W, grams, units, o.granularity, weighted, d)
            if o.method in ("auto", "sketch"):
                forms += sketch_forms(spec, W, grams, units, o.granularity, o.l, o.seed, o.dist, fit_init,
                                      sketch_sizes, weighted, d)
            if forms:
                out.append(Choices(spec, forms=forms))
            else:
                out.append(Choices(spec, dense_decision(spec, SkipReason.NOT_CHEAPER,
                                                        "no factored form is cheaper than dense in the budget's "
                                                        "units")))
            adv(1, spec.name)
    return out


# --------------------------------------------------------------------------- solve
def choose(choices: list[Choices], weights: list[float], budget: Budget, *, model_params: int, model_macs: int,
           granularity: int, l: int, latency: dict | None = None) -> list[Decision]:
    """One decision per layer minimising ``Σ weight_i · error_i`` within ``budget`` (the candidates'
    errors weighted by the layers' output gains).  ``latency`` (latency budgets): ``{"total": the dense
    model's measured ms, "offset": the correction the whole-model measurements found}``; every free layer's
    forms then carry their measured ``ms``.  Raises :class:`InfeasibleBudgetError` with the smallest
    achievable value."""
    totals = {"params": float(model_params), "flops": float(model_macs)}
    if latency is not None:
        totals["latency"] = float(latency["total"])
    limits = budget.limits(totals)
    units = tuple(limits)
    free = [i for i, c in enumerate(choices) if c.fixed is None]
    fixed = {"params": float(model_params), "flops": float(model_macs)}
    if latency is not None:  # what is not a free layer: the dense total less the free layers' own times
        fixed["latency"] = totals["latency"] + float(latency.get("offset", 0.0)) - sum(
            choices[i].dense_ms or 0.0 for i in free)
    for c in choices:  # fixed cost = the model minus what the free layers cost when dense
        if c.fixed is None:
            fixed["params"] -= c.spec.params
            fixed["flops"] -= c.spec.macs
        else:
            fixed["params"] -= c.spec.params - c.fixed.params
            fixed["flops"] -= c.spec.macs - c.fixed.macs
    rows = []
    for i in free:
        c = choices[i]
        lat = {"latency": c.dense_ms or 0.0} if latency is not None else {}
        row = [Candidate({"params": c.spec.params, "flops": c.spec.macs, **lat}, 0.0, None)]
        row += [Candidate({"params": f.params, "flops": f.macs, **({"latency": f.ms} if latency is not None else {})},
                          weights[i] * f.error, f) for f in c.forms if latency is None or f.ms is not None]
        rows.append(row)
    if rows:
        try:
            picked = solve(rows, limits, fixed)
        except InfeasibleBudgetError as exc:  # add the smallest achievable value as a fraction of the model
            lows = {u: fixed[u] + sum(min(c.cost[u] for c in row) for row in rows) for u in units}
            fr = ", ".join(f"{u}={lows[u] / totals[u]:.4f}" for u in units if totals.get(u) and lows[u] > limits[u])
            msg = f"{exc}; as a fraction of the model the smallest achievable is {fr}" if fr else str(exc)
            if granularity > 1 and any(u != "latency" and lows[u] > limits[u] for u in units):
                msg += (f" (the smallest candidate sizes are on a grid of granularity={granularity}; a smaller "
                        "granularity= adds smaller sizes)")
            raise InfeasibleBudgetError(msg) from None
    else:
        picked = []
        for u in units:
            if fixed[u] > limits[u] * (1 + 1e-12):
                raise InfeasibleBudgetError(f"the {u} budget {fmt_unit(u, limits[u])} cannot be met: no layer can be "
                                            f"factored, the model stays at {fmt_unit(u, fixed[u])}")
    out: list[Decision] = [c.fixed for c in choices]
    for i, j, row in zip(free, picked, rows):
        f = row[j].tag
        out[i] = (dense_decision(choices[i].spec, SkipReason.SOLVER, "kept dense by the solver") if f is None
                  else decision_of(f, l))
        if latency is not None:
            out[i].ms = choices[i].dense_ms if f is None else f.ms
    return out


def make_plan(choices: list[Choices], decisions: list[Decision], sites: list[Site], *, budget: Budget, o: Options,
              frontend: str, capture: str, calib: dict | None, notes: list[str], model_params: int,
              model_macs: int, has_calib: bool) -> Plan:
    layers = [LayerPlan(c.spec, d, float(s.sensitivity)) for c, d, s in zip(choices, decisions, sites)]
    options = {"l": o.l, "granularity": o.granularity, "init": o.init, "dist": o.dist, "shrink": o.shrink,
               "fit_init": fit_init_of(o.init, has_calib), "holdout": o.holdout, "refit": o.refit,
               "sensitivity_samples": o.sensitivity_samples, "probes": o.probes, "rounds": o.rounds,
               "tolerance": o.tolerance, "metric": o.metric}
    p = Plan(layers=layers, budget=budget.to_dict(), method=o.method, seed=o.seed, frontend=frontend, capture=capture,
             calib=calib, notes=notes, options=options)
    p.recompute_totals(model_params, model_macs)
    return p
