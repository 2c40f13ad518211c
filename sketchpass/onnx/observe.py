"""Observe an ONNX model through ONNX Runtime: input Grams, positions and output sensitivities.

**Layer inputs.**  A copy of the model gets the inputs of the matched nodes as extra graph outputs; ORT
runs it one calibration batch at a time and each layer input becomes a
:class:`~sketchpass.site.LayerInput` (a torch tensor made from the numpy output) for the pipeline's
streaming Grams, so memory holds one batch of activations plus the Grams.  Conv inputs are padded
explicitly first (``pads``, asymmetric ones included, or the ``auto_pad`` amounts for the batch's
shape) and unfolded with zero padding, so the Gram is that of the exact im2col patches the node
multiplies.  Gemm with ``transA`` sees the columns of ``A``.

**Sensitivity.**  ORT has no backward pass, so the output gain of each layer (the same quantity as
the torch frontend's, see :mod:`sketchpass.fx.observe`) is measured by perturbation: another copy of
the model adds a graph input ``δ_i`` to every matched node's output.  For layer ``i`` we feed
``δ_i ~ N(0, ε²‖y_i‖²/D_i)`` (``ε = 10⁻²``, zeros elsewhere) and measure
``g_i = ‖f(y + δ) − f(y)‖² / (ε² ‖f‖²)``, which for small ``ε`` is
``‖y_i‖² ‖J_i‖²_F / (D_i ‖f‖²)`` in expectation.  Under ``metric="kl"`` (:mod:`sketchpass.metric`)
``g_i = Σ KL(f(y) ‖ f(y + δ)) / (ε² · positions)``, the same first-order gain counted in mean KL: both are
``num / (ε² den)`` of the metric's ``(num, den)``.  One run per layer and probe on the kept samples
(``sensitivity_samples``, ``probes``); ``sensitivity_samples=0`` weights every layer equally (a plan
note says so).

**Single-layer errors** (the verify loop's attribution) use the same perturbation model: ``δ_i`` is the
fitted module's output minus the dense layer's on the layer's original input, computed in torch.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from ..metric import Metric
from ..site import LayerInput, Site

EPS = 1e-2


def session(model: onnx.ModelProto):
    """An ORT CPU session for an in-memory model (written to a temporary folder when > 2 GB)."""
    import onnxruntime as ort

    from .load import needs_external, save

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if needs_external(model):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            p = save(model, f"{d}/model.onnx", external_data=True)
            return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def elem_types(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    """Element types of tensors (by shape inference; ``names`` it cannot type are left out)."""
    from .macs import skeleton

    try:
        inf = onnx.shape_inference.infer_shapes(skeleton(model))
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError):
        inf = model
    types = {}
    for vi in list(inf.graph.value_info) + list(inf.graph.input) + list(inf.graph.output):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    return {n: types[n] for n in names if n in types}


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (untyped outputs: ORT infers the types)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in dict.fromkeys(names):
        if n not in have:
            vi = m.graph.output.add()
            vi.name = n
    return m


def conv_pads(attrs: dict, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Explicit ``(begin..., end...)`` pads of a Conv for an input of this spatial shape."""
    a = attrs
    nd = len(spatial)
    if a["auto_pad"] == "VALID":
        return (0,) * (2 * nd)
    if a["auto_pad"] in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial, a["kernel"], a["strides"], a["dilations"]):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            b = small if a["auto_pad"] == "SAME_UPPER" else total - small
            begin.append(b)
            end.append(total - b)
        return tuple(begin + end)
    return tuple(a["pads"])


def layer_input(site: Site, x: np.ndarray) -> LayerInput:
    """One batch of a matched node's input as a :class:`LayerInput`: Conv inputs padded explicitly
    (``pads``, asymmetric ones included, or the ``auto_pad`` amounts for this shape); Gemm with
    ``transA`` sees the columns of ``A``."""
    spec, ref = site.spec, site.ref
    t = torch.from_numpy(np.ascontiguousarray(x))
    if ref.kind == "Conv":
        a = ref.attrs
        nd = t.dim() - 2
        pads = conv_pads(a, tuple(t.shape[2:]))
        xp = t
        if any(pads):
            fp = []
            for i in reversed(range(nd)):  # F.pad: last dim first
                fp += [pads[i], pads[nd + i]]
            xp = F.pad(t, fp)
        p_out = 1
        for size, k, s, d in zip(xp.shape[2:], a["kernel"], a["strides"], a["dilations"]):
            p_out *= (size - d * (k - 1) - 1) // s + 1
        n = t.shape[0]
        return LayerInput(xp, n, math.prod(t.shape[2:]) * n, p_out * n, tuple(x.shape), t.dtype)
    if ref.kind == "Gemm" and ref.attrs.get("transA"):
        t = t.T
    rows = t.reshape(-1, spec.d_in)
    n = int(x.shape[0]) if x.ndim else 1
    return LayerInput(rows, n, rows.shape[0], rows.shape[0], tuple(x.shape), t.dtype)


def perturbation_model(model: onnx.ModelProto, sites: list[Site]) -> tuple[onnx.ModelProto, dict]:
    """A copy where every site's output ``y`` becomes ``y_pre + δ`` (``δ`` a new graph input, any shape);
    ``y_pre`` is an extra output.  Returns the model and ``name → (δ input, y_pre output)``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    types = elem_types(model, [s.ref.y for s in sites])
    by_output = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            by_output[o] = i
    names = {}
    inserts = []
    for s in sites:
        y = s.ref.y
        # the output has the weight's float type when inference cannot tell
        t = types.get(y, onnx.helper.np_dtype_to_tensor_dtype(s.weight.numpy().dtype))
        idx = by_output[y]
        pre, delta = f"{y}__sp_pre", f"{y}__sp_delta"
        node = g.node[idx]
        node.output[list(node.output).index(y)] = pre
        inserts.append((idx, onnx.helper.make_node("Add", [pre, delta], [y], name=f"{y}__sp_perturb")))
        g.input.append(onnx.helper.make_tensor_value_info(delta, t, None))
        vi = g.output.add()
        vi.name = pre
        names[s.name] = (delta, pre, onnx.helper.tensor_dtype_to_np_dtype(t))
    for idx, node in sorted(inserts, key=lambda t: -t[0]):
        g.node.insert(idx + 1, node)
    return m, names


def _floats(arrays) -> list[np.ndarray]:
    return [a.astype(np.float64) for a in arrays if np.issubdtype(a.dtype, np.floating)]


def _torch(arrays) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


def sensitivity(model: onnx.ModelProto, sites: list[Site], batches: list[dict], probes: int = 1,
                seed: int = 0, metric: Metric | None = None) -> dict[str, float]:
    """Output gain of every active site by perturbation (see module docstring)."""
    metric = metric or Metric()
    active = [s for s in sites if s.skip is None]
    if not active or not batches:
        return {}
    m, names = perturbation_model(model, active)
    sess = session(m)
    real_out = [o.name for o in model.graph.output]
    rng = np.random.default_rng(seed)
    zero = {names[s.name][0]: np.zeros((1,), dtype=names[s.name][2]) for s in active}
    gsq = {s.name: 0.0 for s in active}
    fsq = 0.0
    for feed in batches:
        base_out = real_out + [names[s.name][1] for s in active]
        res = sess.run(base_out, {**feed, **zero})
        f0 = _floats(res[:len(real_out)])
        if not f0:
            raise ValueError("the model output has no floating-point tensor to measure sensitivity on")
        f0 = _torch(f0)
        fsq += metric.denominator(f0)
        ys = dict(zip([s.name for s in active], res[len(real_out):]))
        for s in active:
            y = ys[s.name]
            scale = EPS * math.sqrt(float(np.square(y.astype(np.float64)).sum()) / max(y.size, 1))
            if scale == 0 or not math.isfinite(scale):
                continue
            for _ in range(probes):
                d = (rng.standard_normal(y.shape) * scale).astype(y.dtype)
                fo = _torch(_floats(sess.run(real_out, {**feed, **zero, names[s.name][0]: d})))
                gsq[s.name] += metric.errors(f0, fo)[0] / probes
        del ys, res
    if fsq == 0:
        return {s.name: 0.0 for s in active}
    return {n: v / (EPS**2 * fsq) for n, v in gsq.items()}


def single_layer_errors(model: onnx.ModelProto, sites: list[Site], modules: dict, batches: list[dict],
                        metric: Metric | None = None) -> dict:
    """``{site: (num, den)}`` of the output error (``metric``; default ``(Σ‖f_i − f‖², Σ‖f‖²)``) with only
    site ``i``'s fitted module in place of its layer: its output change ``δ_i = module(x) − W x`` (bias-free,
    in torch, from the layer's original input) added through :func:`perturbation_model`."""
    if not sites or not batches:
        return {}
    m, names = perturbation_model(model, sites)
    m = with_outputs(m, [s.ref.x for s in sites])
    sess = session(m)
    real_out = [o.name for o in model.graph.output]
    zero = {names[s.name][0]: np.zeros((1,), dtype=names[s.name][2]) for s in sites}
    out = {s.name: [0.0, 0.0] for s in sites}
    for feed in batches:
        fetch = real_out + [names[s.name][1] for s in sites] + [s.ref.x for s in sites]
        res = sess.run(fetch, {**feed, **zero})
        f0 = _torch(_floats(res[:len(real_out)]))
        den = metric.denominator(f0)
        ys = res[len(real_out):len(real_out) + len(sites)]
        xs = res[len(real_out) + len(sites):]
        for s, y, x in zip(sites, ys, xs):
            inp = layer_input(s, x)
            mod, dense = modules[s.name], s.dense
            with torch.no_grad():
                xin = inp.x.to(dense.weight.dtype)
                delta = (mod(xin) - dense(xin)).reshape(y.shape).numpy().astype(y.dtype)
            fo = _torch(_floats(sess.run(real_out, {**feed, **zero, names[s.name][0]: delta})))
            out[s.name][0] += metric.errors(f0, fo)[0]
            out[s.name][1] += den
    return {k: (v[0], v[1]) for k, v in out.items()}
