"""The ONNX frontend: the graph-specific steps of :mod:`sketchpass.pipeline` for an ONNX model (ONNX in →
ONNX out).

Conventions (also written into every plan's notes where they apply):

* **params** of the model = elements of all floating-point initializers and Constant-node values,
  plus matched weights computed by constant subgraphs (:func:`~sketchpass.onnx.match.weight_elements`);
  ``Budget(params=f)`` is a fraction of that.
* **MACs** per sample = Conv/Gemm/MatMul MACs of the main graph at the first calibration batch's
  shapes (or the model's static shapes) (:mod:`sketchpass.onnx.macs`); matched layers use the positions
  measured on the calibration batches.
* **calib=None**: data-free fits; positions from ``example_inputs`` or static shapes where known, else 1
  (noted).
* **sensitivity** by perturbation through ORT (:mod:`sketchpass.onnx.observe`): one run per layer of the
  kept samples — the cost grows with the number of layers, where the torch frontend's one backward pass
  does not.
* **sequential refit** through ORT, segment by segment (:mod:`sketchpass.onnx.segments`).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from ..batches import Calib
from ..metric import metric as metric_of
from ..options import Options
from ..pipeline import SensitivityUnavailable
from ..plan import Plan
from ..site import LayerInput, Site, layer_error
from . import observe as ob
from .feeds import feed_size, graph_inputs, iter_feeds
from .load import load
from .macs import count_macs, infer_shapes
from .match import find_sites, nothing_to_compress, weight_stats
from .rewrite import emit_protos, stand_in
from .segments import Segments

PLAN_KEY = "sketchpass.plan"


def _split_feed(feed: dict, n: int) -> tuple[dict, dict]:
    size = feed_size(feed)

    def cut(v, sl):
        return v[sl] if v.ndim and v.shape[0] == size else v

    return {k: cut(v, slice(0, n)) for k, v in feed.items()}, {k: cut(v, slice(n, None)) for k, v in feed.items()}


def _shapes_of(example, inputs) -> dict | None:
    if example is None:
        return None
    if not isinstance(example, dict):
        example = {inputs[0].name: example} if len(inputs) == 1 else example
    return {k: tuple(v) if isinstance(v, (tuple, list)) else tuple(v.shape) for k, v in example.items()}


def _bias_of(site: Site) -> torch.Tensor | None:
    """The bias the node adds itself: Conv ``B``; Gemm ``β C`` when ``C`` is a constant vector of ``d_out``."""
    node = site.ref.node
    if len(node.inputs) < 3 or not isinstance(node.inputs[2], gs.Constant):
        return None
    b = np.asarray(node.inputs[2].values, dtype=np.float64).reshape(-1)
    if b.size != site.spec.d_out:
        return None
    if site.kind == "Gemm":
        b = b * float(site.ref.attrs.get("beta", 1.0))
    return torch.from_numpy(b)


class OnnxFrontend:
    """See the module docstring and :class:`sketchpass.pipeline.Frontend`."""

    name = "onnx"
    capture = "onnx"

    def __init__(self, model, o: Options):
        self.m = load(model, copy=False)  # never modified: the rewrite splices nodes into new protos
        self.o = o
        self.metric = metric_of("mse" if o.metric == "auto" else o.metric)
        self.inputs = graph_inputs(self.m)
        self.graph = gs.import_onnx(self.m)
        self._sites = find_sites(self.graph, self.m)
        for s in self._sites:
            if s.weight is not None and s.skip is None:
                s.dense = stand_in(s)
                s.bias = _bias_of(s)
        self.notes = ["ONNX: params = elements of all floating-point initializers and Constant values (plus folded "
                      "weights); MACs = Conv/Gemm/MatMul of the main graph"]
        self.notes += [f"{s.name}: {s.detail}" for s in self._sites if s.detail and "inside a subgraph" in s.detail]
        self._first_shapes = None
        self._observe_session = None
        self._segments: Segments | None = None
        self._fitted: dict[str, torch.nn.Module] = {}

    # ----------------------------------------------------------------- data and capture
    def calib(self, calib, o: Options) -> Calib:
        reiterable = isinstance(calib, (str, dict, list, tuple, np.ndarray)) or hasattr(calib, "detach") or (
            hasattr(calib, "__iter__") and iter(calib) is not calib)
        return Calib(lambda notes: iter_feeds(calib, self.inputs, o.batch_size, notes=notes), size=feed_size,
                     split=_split_feed, holdout=o.holdout, max_batches=o.max_batches, reiterable=reiterable,
                     max_bytes=o.max_activation_mb * 2**20)

    def prepare(self, first) -> None:
        self._first_shapes = None if first is None else {k: tuple(v.shape) for k, v in first.items()}

    def sites(self) -> list[Site]:
        return self._sites

    def nothing_to_compress(self, sites) -> str | None:
        return nothing_to_compress(self.graph, sites)

    def model_params(self, sites) -> int:
        n, nbytes, ints = weight_stats(self.graph, sites)
        if ints:
            note = (f"ONNX: params include {ints:,} integer (quantized) weights; all weights take {nbytes:,} bytes")
            if note not in self.notes:
                self.notes.append(note)
        return n

    def _shape_source(self, example):
        src = self._first_shapes or _shapes_of(example, self.inputs)
        if src is None and self.inputs:  # the model's own shapes, a dynamic batch dim read as 1
            src = {i.name: [1 if j == 0 and not isinstance(d, int) else d for j, d in enumerate(i.shape)]
                   for i in self.inputs if i.shape is not None}
        return src

    def model_macs(self, sites, batch) -> int:
        src = self._shape_source(self.o.example_inputs)
        shapes = infer_shapes(self.m, src)
        first = self.inputs[0].name if self.inputs else None
        b = (src or {}).get(first, (1,))[0] if src else 1
        macs, _ = count_macs(self.m, shapes, b if isinstance(b, int) and b > 0 else 1)
        return macs

    def positions_without_data(self, sites, example) -> list[str]:
        src = self._shape_source(example)
        shapes = infer_shapes(self.m, src)
        first = self.inputs[0].name if self.inputs else None
        batch = (src or {}).get(first, (1,))[0] if src else 1
        batch = batch if isinstance(batch, int) and batch > 0 else 1
        unknown = 0
        for s in sites:
            if s.spec.d_in == 0:
                continue
            xs, ys = shapes.get(s.ref.x), shapes.get(s.ref.y)
            if xs is None or ys is None or any(d is None for d in xs + ys) or not xs:
                unknown += 1
                s.spec.p_in = s.spec.p_out = 1
                continue
            s.extra.setdefault("input_shape", tuple(xs))
            if s.kind == "Conv":
                s.spec.p_in, s.spec.p_out = max(1, math.prod(xs[2:])), max(1, math.prod(ys[2:]))
            else:
                rows = math.prod(xs) // max(s.spec.d_in, 1)
                s.spec.p_in = s.spec.p_out = max(1, rows // batch)
        if unknown:
            return [f"{unknown} layer(s) without static shapes: MACs counted at one position per sample (pass "
                    "example_inputs= for real MAC counts)"]
        return []

    # ----------------------------------------------------------------- observe
    def calibration_groups(self, sites):
        return None, "ONNX graphs are calibrated whole"

    def observe_blocks(self, batches, groups, visit, on_batch, finish, max_bytes) -> None:
        raise NotImplementedError("ONNX graphs are calibrated whole")

    def observe_batch(self, batch, sites, visit) -> None:
        key = tuple(s.name for s in sites)
        if self._observe_session is None or self._observe_session[0] != key:
            self._observe_session = (key, ob.session(ob.with_outputs(self.m, [s.ref.x for s in sites])))
        sess = self._observe_session[1]
        names = list(dict.fromkeys(s.ref.x for s in sites))
        vals = dict(zip(names, sess.run(names, batch)))
        for s in sites:
            visit(s, ob.layer_input(s, vals[s.ref.x]))

    def sensitivities(self, sites, batches, probes, seed) -> dict[str, float]:
        try:
            return ob.sensitivity(self.m, sites, batches, probes=probes, seed=seed, metric=self.metric)
        except ValueError as exc:
            raise SensitivityUnavailable(f"sensitivities could not be measured ({exc})") from None

    # ----------------------------------------------------------------- fit and rewrite
    def begin(self) -> None:
        self._segments = Segments(self.m)
        if not self._segments.topological():
            raise ValueError("the ONNX graph's nodes are not in topological order (onnx.checker requires it); "
                             "sort it first, e.g. with onnx-graphsurgeon: graph.toposort()")
        self._fitted = {}
        self._names = {t.name for t in self.m.graph.initializer} | {n.name for n in self.m.graph.node if n.name}
        self._names |= {o for n in self.m.graph.node for o in n.output} | {i.name for i in self.m.graph.input}
        self._observe_session = None

    def refit_steps(self, sites: list[Site]) -> list[list[Site]]:
        groups = self._segments.plan_steps([s.ref.y for s in sites], [s.ref.x for s in sites])
        return [[sites[i] for i in g] for g in groups]

    def start(self, batch):
        return self._segments.start(batch)

    def advance(self, step: int, env):
        return self._segments.advance(step, env)

    def end_refit(self) -> None:
        pass

    def site_inputs(self, env, site: Site, original: bool = False) -> tuple[LayerInput, LayerInput] | None:
        env_o, env_n = env
        x = env_o.get(site.ref.x)
        xh = x if original else env_n.get(site.ref.x)
        if x is None or xh is None:
            return None
        inp = ob.layer_input(site, x)
        return inp, (inp if xh is x else ob.layer_input(site, xh))

    def replace(self, site: Site, module: torch.nn.Module) -> None:
        module.train(False)
        self._fitted[site.name] = module
        nodes, inits = emit_protos(site, module, dtype=site.weight.numpy().dtype, storage=self.o.u_storage,
                                   names=self._names, opset=self._opset())
        self._segments.replace(self._segments.index_of(site.ref.y), nodes, inits)

    def _opset(self) -> int:
        return next((int(o.version) for o in self.m.opset_import if o.domain in ("", "ai.onnx")), 0)

    def export(self, plan: Plan) -> onnx.ModelProto:
        g = onnx.GraphProto()
        g.CopyFrom(self.m.graph)
        del g.node[:]
        g.node.extend(self._segments.spliced())
        g.initializer.extend(self._segments.extra.values())
        work = onnx.ModelProto()
        _copy_fields(self.m, work)
        work.graph.CopyFrom(g)
        graph = gs.import_onnx(work)
        out = finish(self.m, graph, plan)
        if self.o.check:
            verify(out)
        return out

    def stamp(self, emitted: onnx.ModelProto, plan: Plan) -> None:
        meta = [e for e in emitted.metadata_props if e.key != PLAN_KEY]
        del emitted.metadata_props[:]
        emitted.metadata_props.extend(meta)
        emitted.metadata_props.add(key=PLAN_KEY, value=plan.to_json(indent=None))

    # ----------------------------------------------------------------- verify
    def compare(self, emitted: onnx.ModelProto, batch, sites) -> tuple[list, list, dict]:
        names = [s.ref.y for s in sites]
        cached = getattr(self, "_compare", None)
        if cached is None or cached[0] is not emitted or cached[1] != names:
            self._compare = (emitted, names, ob.session(ob.with_outputs(self.m, names)),
                             ob.session(ob.with_outputs(emitted, names)))
        real = [o.name for o in self.m.graph.output]
        fetch = real + list(dict.fromkeys(names))
        a = dict(zip(fetch, self._compare[2].run(fetch, batch)))
        b = dict(zip(fetch, self._compare[3].run(fetch, batch)))
        ref = [torch.from_numpy(np.asarray(a[n])) for n in real if np.issubdtype(np.asarray(a[n]).dtype, np.floating)]
        out = [torch.from_numpy(np.asarray(b[n])) for n in real if np.issubdtype(np.asarray(b[n]).dtype, np.floating)]
        layers = {s.name: layer_error(torch.from_numpy(a[s.ref.y]), torch.from_numpy(b[s.ref.y]), s) for s in sites}
        return ref, out, layers

    def single_layer_errors(self, sites, batches) -> dict[str, tuple[float, float]]:
        return ob.single_layer_errors(self.m, sites, self._fitted, batches, self.metric)

    def output_mask(self, batch) -> None:
        """Every position counts (the ONNX pass does not read attention masks)."""
        return None

    # ----------------------------------------------------------------- latency
    def timing_signature(self) -> str:
        return f"u_storage={self.o.u_storage}"

    def time_forms(self, site, forms, target) -> dict:
        from .timing import time_forms

        return time_forms(site, forms, target, opset=self._opset(), storage=self.o.u_storage, rounds=5,
                          min_round_ms=10.0)

    def dense_model(self):
        return self.m

    def timing_batch(self, first, example):
        """The feed whole models are timed on: the first calibration batch, else ``example_inputs`` (a feed
        dict, or ``{name: shape}`` filled with random values)."""
        if first is not None:
            return first
        if example is None:
            return None
        if not isinstance(example, dict):
            example = {self.inputs[0].name: example}
        rng = np.random.default_rng(0)
        feed = {}
        for info in self.inputs:
            v = example[info.name]
            if isinstance(v, (tuple, list)):
                v = rng.standard_normal(v) if info.dtype.kind == "f" else np.zeros(v)
            feed[info.name] = np.asarray(v).astype(info.dtype)
        return feed

    def time_models(self, models: dict, batch, target) -> dict:
        from .timing import time_models

        return time_models(models, batch, target)


# --------------------------------------------------------------------------- export
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


def frontend(model, o: Options) -> OnnxFrontend:
    return OnnxFrontend(model, o)
