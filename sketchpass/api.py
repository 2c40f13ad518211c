"""``sketchpass.plan`` / ``apply`` / ``transform`` (DESIGN §2).

``plan`` captures the model, observes it on calibration data (input Grams, shapes, MACs, output
sensitivities), builds candidate forms per layer with predicted errors, and lets the budget solver
choose.  ``apply`` rewrites a copy of the model according to a plan, refitting layer by layer on the
inputs the compressed model really produces when calibration data is given.  ONNX models (a
``ModelProto`` or a path) are routed to :mod:`sketchpass.onnx`, imported only then.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .budget import Budget
from .calib import iter_batches, prefer_channels_last
from .plan import Plan
from .planner import METHODS, PlanLayer, apply_ignore, choose, make_plan  # noqa: F401  (METHODS re-exported)
from .planner import check_options as _check_options
from .report import progress_bar


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

    batches = list(iter_batches(calib, o["max_batches"])) if calib is not None else None
    if batches is not None and not batches:
        raise ValueError("the calibration data yielded no batches")
    cap = capture(model, o["capture"], example=batches[0] if batches else None)
    if batches:
        batches = prefer_channels_last(cap.model, batches)
    sites = find_sites(cap)
    notes = list(cap.notes)
    layers = [PlanLayer(s.spec, s.module.weight, skip=s.skip, kind=type(s.module).__name__) for s in sites]
    apply_ignore(layers, ignore)
    for s, pl in zip(sites, layers):
        s.skip = pl.skip

    data = batches if calib is not None else o["example_inputs"]
    obs = None
    if data is not None:
        with progress_bar("calibrating", None, o["progress"]) as adv:
            obs = observe(cap.model, sites, data, grams=calib is not None,
                          keep_samples=o["sensitivity_samples"] if calib is not None else 0,
                          progress=lambda n: adv(n))
        for s, pl in zip(sites, layers):
            st = obs.stats.get(s.name)
            if s.skip is None and (st is None or st.calls == 0):
                s.skip = pl.skip = "not executed on the calibration data"
            elif st is not None and obs.samples:
                s.spec.p_in = max(1, round(st.positions_in / obs.samples))
                s.spec.p_out = max(1, round(st.positions_out / obs.samples))
            if st is not None:
                pl.gram = st.gram
    elif budget.flops is not None:
        raise ValueError("a flops budget needs input shapes: pass calib= (or example_inputs= for data-free fits)")
    if calib is None:
        notes.append("no calibration data: data-free fits (weight error), every layer weighted equally")
        if o["example_inputs"] is None:
            notes.append("no input shapes: MACs are counted at one position per sample (pass example_inputs= "
                         "for real MAC counts)")

    if calib is not None and obs is not None:
        try:
            with progress_bar("sensitivity", None, o["progress"]):
                sens = sensitivity(cap.model, sites, obs.kept, probes=o["probes"], seed=seed)
        except RuntimeError as exc:  # e.g. in-place ops on tensors autograd needs: no backward through the model
            first = " ".join(str(exc).split())[:160]
            notes.append(f"sensitivities could not be measured (backward through the model failed: {first}); every "
                         "layer weighted equally")
            sens = {}
        if not sens:
            pass
        elif not any(v > 0 for v in sens.values()):
            notes.append("the model output is zero on the calibration data: sensitivities cannot be measured, "
                         "every layer weighted equally")
        else:
            for pl in layers:
                pl.sensitivity = float(sens.get(pl.spec.name, 1.0))

    model_params = _model_params(model)
    layer_macs = sum(s.spec.macs for s in sites if s.spec.d_in)
    model_macs = max(obs.model_macs if obs else 0, layer_macs)
    plans, popts = choose(layers, budget, model_params=model_params, model_macs=model_macs, method=method,
                          seed=seed, overrides=overrides, o=o, has_calib=calib is not None, progress=o["progress"])
    return make_plan(plans, popts, budget=budget, method=method, seed=seed, frontend="torch", capture=cap.capture,
                     calib=None if calib is None else {"samples": obs.samples, "batches": obs.batches},
                     notes=notes, model_params=model_params, model_macs=model_macs)


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
    if batches:
        batches = prefer_channels_last(cap.model, batches)
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
