"""``plan`` / ``apply`` / ``transform`` for ONNX models (ONNX in → ONNX out).

The same planner, candidates, solver and fits as the torch pass (:mod:`sketchpass.planner`,
:mod:`sketchpass.layers`); only capture, observation and emission are ONNX-specific.

Conventions (also written into every plan's notes where they apply):

* **params** of the model = elements of all floating-point initializers and Constant-node values,
  plus matched weights computed by constant subgraphs (:func:`~sketchpass.onnx.match.weight_elements`);
  ``Budget(params=f)`` is a fraction of that.
* **MACs** per sample = Conv/Gemm/MatMul MACs of the main graph at the first calibration batch's
  shapes (or the model's static shapes) (:mod:`sketchpass.onnx.macs`); matched layers use the positions
  measured on all calibration batches.
* **calib=None**: data-free fits; positions from static shapes where known, else 1 (noted).
* **sensitivity** by perturbation through ORT (:mod:`sketchpass.onnx.observe`).
* **no sequential refit**: ``apply`` fits every layer on the Grams of the original model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import onnx
import onnx_graphsurgeon as gs

from ..budget import Budget
from ..plan import Plan
from ..planner import OPTION_KEYS, PlanLayer, apply_ignore, check_options, choose, make_plan
from ..report import progress_bar
from . import observe as obs_mod
from .emit import U_STORAGE, Emitter
from .feeds import graph_inputs, iter_feeds
from .load import load
from .macs import count_macs, infer_shapes
from .match import Site, find_sites, weight_elements
from .rewrite import build, emit, measured_error

ONNX_OPTIONS = {"batch_size", "max_gram_mb"}
ONNX_DEFAULTS = {"sensitivity_samples": 4, "probes": 1, "max_gram_mb": 2048, "batch_size": None}
APPLY_OPTIONS = {"max_batches", "shrink", "progress", "refit", "batch_size", "u_storage", "check", "max_gram_mb"}
PLAN_KEY = "sketchpass.plan"


def _capture(model):
    m = load(model, copy=False)
    graph = gs.import_onnx(m)
    sites = find_sites(graph, m)
    return m, graph, sites


def _positions_from_shapes(sites: list[Site], shapes: dict, batch: int) -> int:
    """Fill ``p_in``/``p_out`` of every site from inferred shapes; returns how many stayed unknown."""
    unknown = 0
    for s in sites:
        if s.spec.d_in == 0:
            continue
        xs, ys = shapes.get(s.x), shapes.get(s.y)
        if xs is None or ys is None or any(d is None for d in xs + ys) or not xs:
            unknown += 1
            s.spec.p_in = s.spec.p_out = 1
            continue
        if s.kind == "Conv":
            s.spec.p_in, s.spec.p_out = max(1, math.prod(xs[2:])), max(1, math.prod(ys[2:]))
        else:
            rows = math.prod(xs) // max(s.spec.d_in, 1)
            p = max(1, rows // max(batch, 1))
            s.spec.p_in = s.spec.p_out = p
    return unknown


def _shapes_of(example, inputs) -> dict | None:
    if example is None:
        return None
    if not isinstance(example, dict):
        example = {inputs[0].name: example} if len(inputs) == 1 else example
    return {k: tuple(v) if isinstance(v, (tuple, list)) else tuple(v.shape) for k, v in example.items()}


def plan(model, budget, calib=None, method: str = "auto", seed: int = 0, ignore: Iterable[str] = (),
         overrides: dict | None = None, **options) -> Plan:
    """Plan an ONNX model (a ``ModelProto`` or a path).  Options: those of :func:`sketchpass.plan`
    (``sensitivity_samples`` defaults to 4 and ``probes`` to 1 here; ``capture`` is ignored;
    ``example_inputs`` is a feed dict or ``{name: shape}`` for MACs without data), plus ``batch_size``
    (rows per batch when ``calib`` is an ``.npz``, default 32) and ``max_gram_mb`` (layers whose Gram
    would exceed this many MiB are fitted data-free, default 2048)."""
    given = set(options)
    o = check_options(method, seed, options, known=OPTION_KEYS | ONNX_OPTIONS)
    for k, v in ONNX_DEFAULTS.items():
        if k not in given:
            o[k] = v
    budget = Budget.parse(budget) if not isinstance(budget, Budget) else budget
    m, graph, sites = _capture(model)
    inputs = graph_inputs(m)
    layers = [PlanLayer(s.spec, s.weight, skip=s.skip, kind=s.kind) for s in sites]
    apply_ignore(layers, ignore)
    for s, pl in zip(sites, layers):
        s.skip = pl.skip
    notes = ["ONNX: params = elements of all floating-point initializers and Constant values (plus folded "
             "weights); MACs = Conv/Gemm/MatMul of the main graph", "ONNX: no sequential refit; every layer is "
             "fitted on the inputs of the original model"]
    notes += [f"{s.name}: {s.skip}" for s in sites if s.skip and "inside a subgraph" in s.skip]

    obs = None
    has_calib = calib is not None
    if has_calib:
        feeds = iter_feeds(calib, inputs, o["batch_size"], o["max_batches"])
        keep = o["sensitivity_samples"] if o["sensitivity_samples"] else 0
        with progress_bar("calibrating", None, o["progress"]) as adv:
            obs = obs_mod.observe(m, sites, feeds, keep_samples=keep, max_gram_bytes=o["max_gram_mb"] * 2**20,
                                  progress=lambda n: adv(n))
        if obs.batches == 0:
            raise ValueError("the calibration data yielded no batches")
        for s, pl in zip(sites, layers):
            st = obs.stats.get(s.name)
            if st is not None and st.calls:
                s.spec.p_in = max(1, round(st.positions_in / obs.samples))
                s.spec.p_out = max(1, round(st.positions_out / obs.samples))
                pl.gram = st.gram
                if st.nonfinite and s.skip is None:
                    notes.append(f"{s.name}: its calibration inputs overflow (inf/NaN); fitted data-free")
                elif st.gram is None and s.skip is None:
                    notes.append(f"{s.name}: its input Gram would exceed max_gram_mb={o['max_gram_mb']}; fitted "
                                 f"data-free")
        shape_src = obs.first_shapes
    else:
        shape_src = _shapes_of(o["example_inputs"], inputs)
        if shape_src is None and inputs:  # the model's own shapes, a dynamic batch dim read as 1
            shape_src = {i.name: [1 if j == 0 and not isinstance(d, int) else d for j, d in enumerate(i.shape)]
                         for i in inputs if i.shape is not None}
        notes.append("no calibration data: data-free fits (weight error), every layer weighted equally")
    shapes = infer_shapes(m, shape_src)
    first = inputs[0].name if inputs else None
    batch = (shape_src or {}).get(first, (1,))[0] if shape_src else (shapes.get(first) or [1])[0] or 1
    if not has_calib:
        unknown = _positions_from_shapes(sites, shapes, batch)
        if unknown:
            notes.append(f"{unknown} layer(s) without static shapes: MACs counted at one position per sample "
                         f"(pass example_inputs= for real MAC counts)")
        if budget.flops is not None and shape_src is None and unknown:
            raise ValueError("a flops budget needs input shapes: pass calib= (or example_inputs=) for a model "
                             "with dynamic shapes")
    model_macs, _ = count_macs(m, shapes, batch)

    if has_calib and o["sensitivity_samples"] and obs.kept:
        active = [s for s in sites if s.skip is None]
        with progress_bar("sensitivity", len(active) * len(obs.kept), o["progress"]) as adv:
            sens = obs_mod.sensitivity(m, sites, obs.kept, probes=o["probes"], seed=seed,
                                       progress=lambda n, name: adv(n, name))
        if sens and not any(v > 0 for v in sens.values()):
            notes.append("the model output does not move when layer outputs are perturbed: sensitivities cannot "
                         "be measured, every layer weighted equally")
        else:
            for pl in layers:
                pl.sensitivity = float(sens.get(pl.spec.name, 1.0))
    elif has_calib:
        notes.append("sensitivity_samples=0: every layer weighted equally")

    model_params = weight_elements(graph, sites)
    layer_macs = sum(s.spec.macs for s in sites if s.spec.d_in)
    model_macs = max(model_macs, layer_macs)
    plans, popts = choose(layers, budget, model_params=model_params, model_macs=model_macs, method=method,
                          seed=seed, overrides=overrides, o=o, has_calib=has_calib, progress=o["progress"])
    p = make_plan(plans, popts, budget=budget, method=method, seed=seed, frontend="onnx", capture="onnx",
                  calib=None if obs is None else {"samples": obs.samples, "batches": obs.batches},
                  notes=notes, model_params=model_params, model_macs=model_macs)
    if obs is not None:  # transform() hands the same plan and calib to apply: reuse these Grams there
        p._sp_onnx_grams = (calib, {s.name: obs.stats[s.name].gram for s in sites if s.name in obs.stats})
    return p


def _check_plan_site(lp, s: Site) -> None:
    spec = s.spec
    if (spec.d_in, spec.d_out, spec.groups) != (lp.spec.d_in, lp.spec.d_out, lp.spec.groups):
        raise ValueError(f"layer {spec.name!r}: the plan expects {lp.spec.d_in}→{lp.spec.d_out} (groups "
                         f"{lp.spec.groups}), the model has {spec.d_in}→{spec.d_out} (groups {spec.groups})")
    if s.skip is not None and not s.skip.startswith(("ignored by user", "not executed")):
        raise ValueError(f"layer {spec.name!r} cannot be factored here: {s.skip}")


def apply(model, plan: Plan, calib=None, **options) -> onnx.ModelProto:
    """Rewrite a copy of the ONNX ``model`` as ``plan`` says (a plan made on the torch model works too, by
    layer name); returns a new ``ModelProto`` carrying the plan (with measured errors) in its
    ``metadata_props`` under ``"sketchpass.plan"``.

    With ``calib`` every factored layer is fitted on its input Gram in the original model (no sequential
    refit: ``refit=True`` is refused).  Options: ``u_storage`` (``"float"``, ``"int8"`` or ``"bits"``; see
    :mod:`sketchpass.onnx.emit`), ``max_batches``, ``batch_size``, ``shrink``, ``progress``, ``check``
    (run ``onnx.checker`` with ``full_check=True``, default True), ``max_gram_mb``."""
    unknown = set(options) - APPLY_OPTIONS
    if unknown:
        raise TypeError(f"unknown apply option(s) {sorted(unknown)}; known: {sorted(APPLY_OPTIONS)}")
    if not isinstance(plan, Plan):
        raise TypeError(f"apply expects a sketchpass.Plan, got {type(plan).__name__} (use Plan.from_json)")
    if options.get("refit"):
        raise ValueError("refit=True (sequential refit) is not implemented for ONNX models; every layer is fitted on "
                         "the inputs of the original model — pass refit=False or leave it out")
    storage = options.get("u_storage", "float")
    if storage not in U_STORAGE:
        raise ValueError(f"u_storage must be one of {U_STORAGE}, got {storage!r}")
    shrink = options.get("shrink", plan.options.get("shrink", "auto"))
    m = load(model, copy=False)  # never modified: edits happen on the gs graph, exported into a new model
    graph = gs.import_onnx(m)
    sites = {s.name: s for s in find_sites(graph, m)}
    out_plan = copy.deepcopy(plan)
    todo = []
    for lp in out_plan.layers:
        if lp.decision.method == "dense":
            continue
        if lp.spec.name not in sites:
            raise ValueError(f"layer {lp.spec.name!r} of the plan is not in this model (it has: "
                             f"{', '.join(list(sites)[:8])}...); was the plan made for another model?")
        s = sites[lp.spec.name]
        _check_plan_site(lp, s)
        s.skip = None
        todo.append((s, lp))

    init = plan.options.get("init", "auto")
    fit_init = "random" if init == "random" else plan.options.get("fit_init", "calibrated" if calib is not None
                                                                   else "lstsq")
    grams = {}
    if calib is not None and init != "random" and todo:
        cached = getattr(plan, "_sp_onnx_grams", None)
        if cached is not None and cached[0] is calib:
            grams = {s.name: cached[1].get(s.name) for s, _ in todo}
        else:
            active = [s for s, _ in todo]
            feeds = iter_feeds(calib, graph_inputs(m), options.get("batch_size"), options.get("max_batches"))
            mb = options.get("max_gram_mb", ONNX_DEFAULTS["max_gram_mb"])
            with progress_bar("calibrating", None, options.get("progress")) as adv:
                ob = obs_mod.observe(m, active, feeds, max_gram_bytes=mb * 2**20, progress=lambda n: adv(n))
            grams = {s.name: ob.stats[s.name].gram for s in active if s.name in ob.stats}
    if calib is None and fit_init == "calibrated":
        fit_init = "lstsq"

    seed, dist = plan.seed, plan.options.get("dist", "rademacher")
    with progress_bar("fitting", len(todo), options.get("progress")) as adv:
        for s, lp in todo:
            acc = grams.get(s.name)
            shrunk = acc.shrunk(shrink) if acc is not None else None
            mod = build(s, lp.decision, seed=seed, dist=dist, init=fit_init, grams=shrunk)
            if fit_init != "random":
                lp.decision.measured_error = measured_error(s, mod, None if acc is None else acc.gram)
            em = Emitter(graph, s.weight.numpy().dtype, storage)
            emit(em, s, lp.decision, mod, dist)
            adv(1, s.name)
    out_plan.calib = out_plan.calib if calib is not None else None
    out = finish(m, graph, out_plan)
    if options.get("check", True):
        verify(out)
    return out


def finish(original: onnx.ModelProto, graph: gs.Graph, p: Plan) -> onnx.ModelProto:
    """Export ``graph`` (cleaned up, topologically sorted) into a copy of ``original``'s model fields, with
    the plan in ``metadata_props``; graph inputs/outputs keep their names, shapes and dtypes."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    exported = gs.export_onnx(graph, do_type_check=False)
    out = onnx.ModelProto()
    _copy_fields(original, out)
    out.graph.CopyFrom(exported.graph)
    if original.ir_version < 4:  # initializers must also be graph inputs before IR 4
        have = {i.name for i in out.graph.input}
        for t in out.graph.initializer:
            if t.name not in have:
                out.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    _restore_io(original.graph, out.graph)
    meta = [e for e in original.metadata_props if e.key != PLAN_KEY]
    del out.metadata_props[:]
    out.metadata_props.extend(meta)
    out.metadata_props.add(key=PLAN_KEY, value=p.to_json(indent=None))
    return out


def _copy_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(dst, f, getattr(src, f))
    dst.opset_import.extend(src.opset_import)
    dst.functions.extend(src.functions)
    dst.metadata_props.extend(src.metadata_props)


def _restore_io(src: onnx.GraphProto, dst: onnx.GraphProto) -> None:
    """Graph inputs/outputs exactly as in the original (gs may drop or re-type them)."""
    ins = {i.name: i for i in src.input}
    for i, vi in enumerate(dst.input):
        if vi.name in ins:
            dst.input[i].CopyFrom(ins[vi.name])
    outs = {o.name: o for o in src.output}
    for i, vi in enumerate(dst.output):
        if vi.name in outs:
            dst.output[i].CopyFrom(outs[vi.name])


def verify(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with ``full_check=True`` (which runs strict shape inference); through a temporary
    file with external data when the model is over 2 GB."""
    from .load import needs_external, save

    if needs_external(model):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            p = save(model, f"{d}/model.onnx", external_data=True)
            onnx.checker.check_model(str(p), full_check=True)
        return
    onnx.checker.check_model(model, full_check=True)


def transform(model, budget, calib=None, method: str = "auto", seed: int = 0, ignore: Iterable[str] = (),
              overrides: dict | None = None, **options) -> onnx.ModelProto:
    """``apply(model, plan(model, budget, calib, ...), calib)``; apply options (``u_storage``, ``check``,
    ``refit``) are routed to ``apply``, ``max_batches``/``batch_size``/``shrink``/``progress`` to both."""
    apply_opts = {k: options.pop(k) for k in ("u_storage", "check", "refit") if k in options}
    apply_opts.update({k: options[k] for k in ("max_batches", "batch_size", "shrink", "progress", "max_gram_mb")
                       if k in options})
    p = plan(model, budget, calib=calib, method=method, seed=seed, ignore=ignore, overrides=overrides, **options)
    return apply(model, p, calib=calib, **apply_opts)
