"""``sketchpass.plan`` / ``apply`` / ``transform`` (DESIGN §2).

``plan`` captures the model, observes it on calibration data (input Grams, shapes, MACs, output
sensitivities), builds candidate forms per layer with predicted errors, and lets the budget solver
choose.  ``apply`` rewrites a copy of the model according to a plan, refitting layer by layer on the
inputs the compressed model really produces when calibration data is given.  ONNX models (a
``ModelProto`` or a path) are routed to :mod:`sketchpass.onnx`, imported only then.
"""

from __future__ import annotations

import copy
import fnmatch
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .budget import Budget, Candidate, solve
from .calib import iter_batches
from .candidates import Form, form_error, sketch_forms, svd_forms
from .plan import Decision, LayerPlan, LayerSpec, Plan
from .report import progress_bar
from .sketch.random import DISTRIBUTIONS

METHODS = ("auto", "sketch", "svd")
INIT_CHOICES = ("auto", "calibrated", "lstsq", "sketch", "random")
_OPTION_KEYS = {"l", "granularity", "init", "dist", "max_batches", "capture", "shrink", "sensitivity_samples",
                "probes", "example_inputs", "sketch_sizes", "progress"}


def _is_onnx(model: Any) -> bool:
    if isinstance(model, (str, os.PathLike)):
        return True
    return type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx")


def _onnx():
    try:
        from . import onnx as sp_onnx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"ONNX models need the onnx extras: pip install 'sketchpass[onnx]' ({exc})") from exc
    return sp_onnx


# --------------------------------------------------------------------------- option checks
def _check_options(method: str, seed: int, opts: dict) -> dict:
    unknown = set(opts) - _OPTION_KEYS
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; known: {sorted(_OPTION_KEYS)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    o = {"l": 1, "granularity": 8, "init": "auto", "dist": "rademacher", "max_batches": None, "capture": "auto",
         "shrink": "auto", "sensitivity_samples": 16, "probes": 2, "example_inputs": None, "sketch_sizes": None,
         "progress": None}
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


def _match_rule(spec: LayerSpec, pattern: str, module_type: str) -> int:
    """Precedence of a rule matching this layer: 3 exact name, 2 name glob, 1 op type, 0 none."""
    if pattern == spec.name:
        return 3
    if pattern.lower() in (spec.op, module_type.lower()):
        return 1
    if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(spec.name, pattern):
        return 2
    return 0


def _resolve_override(spec: LayerSpec, module_type: str, overrides: dict):
    """The override of highest precedence (global < op type < name glob < exact name), or ``...``."""
    best, best_p = ..., -1
    for pattern, value in overrides.items():
        p = _match_rule(spec, pattern, module_type)
        if p > best_p and p > 0:
            best, best_p = value, p
    return best


def _override_form(spec: LayerSpec, value, method: str, l: int) -> tuple[str, int]:
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


def _model_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------- plan
def plan(model, budget, calib=None, method: str = "auto", seed: int = 0, ignore: Iterable[str] = (),
         overrides: dict | None = None, **options) -> Plan:
    """Choose a form for every layer so that the model meets ``budget`` with the least predicted loss.

    Options: ``l`` (sketches per layer, default 1), ``granularity`` (size grid, default 8), ``init``
    (``"auto"``: calibrated sketches with data, lstsq without; ``"random"`` for training from scratch),
    ``dist``, ``max_batches`` (cap on calibration batches), ``capture`` (``"auto"``/``"fx"``/
    ``"modules"``), ``shrink`` (Gram shrinkage: ``"auto"`` = Ledoit–Wolf, or a number in [0, 1]),
    ``sensitivity_samples``, ``probes``, ``example_inputs`` (shapes for MACs when ``calib=None``),
    ``sketch_sizes`` (sketch sizes evaluated per layer), ``progress`` (bars on stderr; default: if a TTY).
    """
    if _is_onnx(model):
        return _onnx().plan(model, budget, calib=calib, method=method, seed=seed, ignore=ignore,
                            overrides=overrides, **options)
    from .fx.match import find_sites
    from .fx.observe import observe, sensitivity
    from .fx.trace import capture

    o = _check_options(method, seed, options)
    budget = Budget.parse(budget) if not isinstance(budget, Budget) else budget
    overrides = dict(overrides or {})
    ignore = [ignore] if isinstance(ignore, str) else list(ignore)

    batches = list(iter_batches(calib, o["max_batches"])) if calib is not None else None
    if batches is not None and not batches:
        raise ValueError("the calibration data yielded no batches")
    cap = capture(model, o["capture"], example=batches[0] if batches else None)
    sites = find_sites(cap)
    notes = list(cap.notes)
    for s in sites:
        if s.skip is None:
            mt = type(s.module).__name__
            hit = next((p for p in ignore if _match_rule(s.spec, p, mt)), None)
            if hit is not None:
                s.skip = f"ignored by user ({hit!r})"

    data = batches if calib is not None else o["example_inputs"]
    obs = None
    if data is not None:
        with progress_bar("calibrating", None, o["progress"]) as adv:
            obs = observe(cap.model, sites, data, grams=calib is not None,
                          keep_samples=o["sensitivity_samples"] if calib is not None else 0,
                          progress=lambda n: adv(n))
        for s in sites:
            st = obs.stats.get(s.name)
            if s.skip is None and (st is None or st.calls == 0):
                s.skip = "not executed on the calibration data"
            elif st is not None and obs.samples:
                s.spec.p_in = max(1, round(st.positions_in / obs.samples))
                s.spec.p_out = max(1, round(st.positions_out / obs.samples))
    elif budget.flops is not None:
        raise ValueError("a flops budget needs input shapes: pass calib= (or example_inputs= for data-free fits)")
    if calib is None:
        notes.append("no calibration data: data-free fits (weight error), every layer weighted equally")
        if o["example_inputs"] is None:
            notes.append("no input shapes: MACs are counted at one position per sample (pass example_inputs= "
                         "for real MAC counts)")

    sens = {}
    if calib is not None and obs is not None:
        with progress_bar("sensitivity", None, o["progress"]):
            sens = sensitivity(cap.model, sites, obs.kept, probes=o["probes"], seed=seed)
        if sens and not any(v > 0 for v in sens.values()):
            notes.append("the model output is zero on the calibration data: sensitivities cannot be measured, "
                         "every layer weighted equally")
            sens = {}

    model_params = _model_params(model)
    layer_macs = sum(s.spec.macs for s in sites if s.spec.d_in)
    model_macs = max(obs.model_macs if obs else 0, layer_macs)
    totals = {"params": float(model_params), "flops": float(model_macs)}
    limits = budget.limits(totals)
    units = tuple(limits)

    init = o["init"]
    fit_init = "calibrated" if (init in ("auto", "calibrated") and calib is not None) else \
        ("lstsq" if init in ("auto", "calibrated", "random") else init)
    sketch_sizes = o["sketch_sizes"] or (4 if method == "auto" else 8)

    layers: list[LayerPlan] = []
    free: list[tuple[int, list[Form]]] = []
    with progress_bar("candidates", sum(1 for s in sites if s.skip is None), o["progress"]) as adv:
        for s in sites:
            spec = s.spec
            if s.skip is not None:
                layers.append(LayerPlan(spec, Decision("dense", reason=s.skip, params=spec.params, macs=spec.macs,
                                                       skipped=True), 1.0))
                continue
            w = float(sens.get(s.name, 1.0))
            st = obs.stats.get(s.name) if obs else None
            grams = None
            if st is not None and st.gram is not None:
                grams = st.gram.shrunk(o["shrink"])
            W = s.module.weight
            ov = _resolve_override(spec, type(s.module).__name__, overrides)
            if ov is not ...:
                if ov is None:
                    layers.append(LayerPlan(spec, Decision("dense", reason="kept dense by override", params=spec.params,
                                                           macs=spec.macs), w))
                else:
                    m, size = _override_form(spec, ov, method, o["l"])
                    if size < 1 or (m == "svd" and size > spec.max_rank()) or (m == "sketch" and size % o["l"]):
                        raise ValueError(f"override for {spec.name!r}: size {size} is not valid for {m} (rank in "
                                         f"[1, {spec.max_rank()}]; sketch m a multiple of l={o['l']})")
                    err = form_error(spec, W, grams, m, size, l=o["l"], seed=seed, dist=o["dist"], init=fit_init)
                    layers.append(LayerPlan(spec, _decision(spec, Form(m, size, spec.form_params(m, size),
                                                                       spec.form_macs(m, size), err), o["l"],
                                                            reason="size set by override"), w))
                adv(1, spec.name)
                continue
            forms: list[Form] = []
            if method in ("auto", "svd"):
                forms += svd_forms(spec, W, grams, units, o["granularity"])
            if method in ("auto", "sketch"):
                forms += sketch_forms(spec, W, grams, units, o["granularity"], o["l"], seed, o["dist"], fit_init,
                                      sketch_sizes)
            layers.append(LayerPlan(spec, Decision("dense", params=spec.params, macs=spec.macs), w))
            if forms:
                free.append((len(layers) - 1, forms))
            else:
                layers[-1].decision.reason = "no factored form is cheaper than dense in the budget's units"
            adv(1, spec.name)

    # --- solve: fixed cost = everything that is not a free layer
    free_idx = {i for i, _ in free}
    fixed = {"params": model_params - sum(layers[i].spec.params for i in free_idx)
             - sum(lp.spec.params - lp.decision.params for j, lp in enumerate(layers) if j not in free_idx),
             "flops": model_macs - sum(layers[i].spec.macs for i in free_idx)
             - sum(lp.spec.macs - lp.decision.macs for j, lp in enumerate(layers) if j not in free_idx)}
    cands = []
    for i, forms in free:
        lp = layers[i]
        row = [Candidate({"params": lp.spec.params, "flops": lp.spec.macs}, 0.0, None)]
        row += [Candidate({"params": f.params, "flops": f.macs}, lp.sensitivity * f.error, f) for f in forms]
        cands.append(row)
    choice = solve(cands, limits, fixed) if cands else []
    if not cands:
        from .budget import InfeasibleBudgetError

        for u in units:
            if fixed[u] > limits[u] * (1 + 1e-12):
                raise InfeasibleBudgetError(f"the {u} budget {limits[u]:,.0f} cannot be met: no layer can be "
                                            f"factored, the model stays at {fixed[u]:,.0f}")
    for (i, _), c, row in zip(free, choice, cands):
        f = row[c].tag
        if f is None:
            layers[i].decision.reason = "kept dense by the solver"
        else:
            layers[i].decision = _decision(layers[i].spec, f, o["l"])

    p = Plan(layers=layers, budget=budget.to_dict(), method=method, seed=seed, frontend="torch",
             capture=cap.capture,
             calib=None if calib is None else {"samples": obs.samples, "batches": obs.batches},
             notes=notes,
             options={"l": o["l"], "granularity": o["granularity"], "init": init, "dist": o["dist"],
                      "shrink": o["shrink"], "fit_init": fit_init})
    p.recompute_totals(model_params, model_macs)
    return p


def _decision(spec: LayerSpec, f: Form, l: int, reason: str | None = None) -> Decision:
    if f.method == "svd":
        return Decision("svd", rank=f.size, params=f.params, macs=f.macs, predicted_error=f.error, reason=reason)
    return Decision("sketch", k=f.size // l, l=l, params=f.params, macs=f.macs, predicted_error=f.error, reason=reason)


# --------------------------------------------------------------------------- apply
def apply(model, plan: Plan, calib=None, **options):
    """Rewrite a copy of ``model`` as ``plan`` says.  With ``calib``, every factored layer is refitted on
    the inputs produced by the already-compressed layers before it (``refit=False``: on the inputs of
    the original model instead).  Options: ``max_batches``, ``shrink``, ``progress``, ``refit``.
    The result carries its plan (with measured errors) as ``small.sketchpass_plan``."""
    if _is_onnx(model):
        return _onnx().apply(model, plan, calib=calib, **options)
    from .fx.match import find_sites
    from .fx.rewrite import fit_all, set_module
    from .fx.trace import capture

    unknown = set(options) - {"max_batches", "shrink", "progress", "refit"}
    if unknown:
        raise TypeError(f"unknown apply option(s) {sorted(unknown)}; known: max_batches, shrink, progress, refit")
    if not isinstance(plan, Plan):
        raise TypeError(f"apply expects a sketchpass.Plan, got {type(plan).__name__} (use Plan.from_json)")
    shrink = options.get("shrink", plan.options.get("shrink", "auto"))
    batches = list(iter_batches(calib, options.get("max_batches"))) if calib is not None else None
    cap = capture(model, "modules" if plan.capture == "modules" else "auto", example=batches[0] if batches else None)
    sites = {s.name: s for s in find_sites(cap)}
    out_plan = copy.deepcopy(plan)
    decisions = {}
    for lp in out_plan.layers:
        d = lp.decision
        if lp.spec.name not in sites:
            if d.method != "dense":
                raise ValueError(f"layer {lp.spec.name!r} of the plan is not in this model (it has: "
                                 f"{', '.join(list(sites)[:8])}...); was the plan made for another model?")
            continue
        s = sites[lp.spec.name]
        if d.method != "dense":
            spec = s.spec
            if (spec.d_in, spec.d_out, spec.groups) != (lp.spec.d_in, lp.spec.d_out, lp.spec.groups):
                raise ValueError(f"layer {spec.name!r}: the plan expects {lp.spec.d_in}→{lp.spec.d_out} "
                                 f"(groups {lp.spec.groups}), the model has {spec.d_in}→{spec.d_out} "
                                 f"(groups {spec.groups})")
            if s.skip is not None and not s.skip.startswith(("ignored by user", "not executed")):
                raise ValueError(f"layer {spec.name!r} cannot be factored here: {s.skip}")
            s.skip = None
        decisions[s.name] = d
    active = [s for s in sites.values() if s.name in decisions]
    for s in active:
        if decisions[s.name].method == "dense":
            s.skip = s.skip or "dense"
    init = plan.options.get("init", "auto")
    build_init = "random" if init == "random" else plan.options.get("fit_init", "calibrated" if batches else "lstsq")
    if init == "random":
        batches = None
    n_fit = sum(1 for s in active if decisions[s.name].method != "dense")
    with progress_bar("fitting", n_fit, options.get("progress")) as adv:
        fit_all(cap.model, active, decisions, seed=plan.seed, dist=plan.options.get("dist", "rademacher"),
                init=build_init, batches=batches, shrink=shrink, refit=options.get("refit", True),
                progress=lambda name: adv(1, name))
    small = cap.model
    if isinstance(small, torch.fx.GraphModule):
        if cap.functional:  # functional uses were rewritten in the graph: the graph is the result
            small.delete_all_unused_submodules()
            small.graph.lint()
            small.recompile()
        else:  # keep the user's own class and forward: swap the fitted modules into a copy
            out = copy.deepcopy(model)
            for s in active:
                if decisions[s.name].method != "dense":
                    set_module(out, s.path, small.get_submodule(s.path))
            small = out
    small.train(model.training)
    out_plan.calib = out_plan.calib if calib is not None else None
    small.sketchpass_plan = out_plan
    return small


def transform(model, budget, calib=None, method: str = "auto", seed: int = 0, ignore: Iterable[str] = (),
              overrides: dict | None = None, **options):
    """``apply(model, plan(model, budget, calib, ...), calib)``."""
    apply_opts = {k: options.pop(k) for k in ("refit",) if k in options}
    apply_opts.update({k: options[k] for k in ("max_batches", "shrink", "progress") if k in options})
    p = plan(model, budget, calib=calib, method=method, seed=seed, ignore=ignore, overrides=overrides, **options)
    return apply(model, p, calib=calib, **apply_opts)
