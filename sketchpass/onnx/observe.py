"""Observe an ONNX model through ONNX Runtime: input Grams, positions and output sensitivities.

**Grams.**  A copy of the model gets the inputs of the matched nodes as extra graph outputs; ORT
runs it one calibration batch at a time and each batch's layer inputs go straight into streaming
:class:`~sketchpass.calib.GramAccumulator`\\ s (torch tensors made from the numpy outputs), so memory
holds one batch of activations plus the Grams.  Conv inputs are padded explicitly first (``pads``,
asymmetric ones included, or the ``auto_pad`` amounts for the batch's shape) and unfolded with zero
padding, so the Gram is that of the exact im2col patches the node multiplies.  Gemm with ``transA``
sees the columns of ``A``.

**Sensitivity.**  ORT has no backward pass, so the output gain of each layer (the same quantity as
the torch frontend's, see :mod:`sketchpass.fx.observe`) is measured by perturbation: another copy of
the model adds a graph input ``δ_i`` to every matched node's output.  For layer ``i`` we feed
``δ_i ~ N(0, ε²‖y_i‖²/D_i)`` (``ε = 10⁻²``, zeros elsewhere) and measure
``g_i = ‖f(y + δ) − f(y)‖² / (ε² ‖f‖²)``, which for small ``ε`` is
``‖y_i‖² ‖J_i‖²_F / (D_i ‖f‖²)`` in expectation.  One run per layer and probe on a few kept samples
(ONNX defaults: ``sensitivity_samples=4``, ``probes=1``); ``sensitivity_samples=0`` weights every
layer equally (a plan note says so).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from ..calib import GramAccumulator
from .feeds import feed_size
from .match import Site

EPS = 1e-2


@dataclass
class Stats:
    gram: GramAccumulator | None = None
    positions_in: int = 0
    positions_out: int = 0
    calls: int = 0
    nonfinite: bool = False


@dataclass
class Observation:
    stats: dict[str, Stats] = field(default_factory=dict)
    samples: int = 0
    batches: int = 0
    first_shapes: dict | None = None
    kept: list = field(default_factory=list)


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


def _elem_types(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    from .macs import skeleton

    try:
        inf = onnx.shape_inference.infer_shapes(skeleton(model))
    except Exception:
        inf = model
    types = {}
    for vi in list(inf.graph.value_info) + list(inf.graph.input) + list(inf.graph.output):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    return {n: types.get(n, onnx.TensorProto.FLOAT) for n in names}


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    types = _elem_types(model, names)
    for n in dict.fromkeys(names):
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, types[n], None))
    return m


def conv_pads(site: Site, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Explicit ``(begin..., end...)`` pads of a Conv for an input of this spatial shape."""
    a = site.attrs
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


def conv_input(site: Site, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The explicitly padded input and the output positions per sample."""
    a = site.attrs
    nd = x.dim() - 2
    pads = conv_pads(site, tuple(x.shape[2:]))
    if any(pads):
        fp = []
        for i in reversed(range(nd)):  # F.pad: last dim first
            fp += [pads[i], pads[nd + i]]
        x = F.pad(x, fp)
    p_out = 1
    for size, k, s, d in zip(x.shape[2:], a["kernel"], a["strides"], a["dilations"]):
        p_out *= (size - d * (k - 1) - 1) // s + 1
    return x, p_out


def add_input(st: Stats, site: Site, x: np.ndarray, samples: int, grams: bool = True) -> None:
    """Feed one batch of a layer's input into its statistics."""
    spec = site.spec
    t = torch.from_numpy(np.ascontiguousarray(x))
    st.calls += 1
    if site.kind == "Conv":
        xp, p_out = conv_input(site, t)
        st.positions_in += math.prod(t.shape[2:]) * t.shape[0]
        st.positions_out += p_out * t.shape[0]
        if grams:
            if st.gram is None:
                st.gram = GramAccumulator(spec.d_in // spec.groups * spec.hw, spec.groups)
            a = site.attrs
            st.gram.add_conv_input(xp, a["kernel"], a["strides"], (0,) * len(a["kernel"]), a["dilations"])
        return
    if site.kind == "Gemm" and site.attrs.get("transA"):
        t = t.T
    rows = t.reshape(-1, spec.d_in)
    st.positions_in += rows.shape[0]
    st.positions_out += rows.shape[0]
    if grams:
        if st.gram is None:
            st.gram = GramAccumulator(spec.d_in)
        st.gram.add_rows(rows)


def observe(model: onnx.ModelProto, sites: list[Site], feeds, *, grams: bool = True, keep_samples: int = 0,
            max_gram_bytes: int | None = None, progress: Callable[[int], None] | None = None) -> Observation:
    """One ORT pass over the calibration feeds (see module docstring)."""
    obs = Observation()
    active = [s for s in sites if s.skip is None]
    gram_ok = {}
    for s in active:
        n = s.spec.d_in // s.spec.groups * s.spec.hw
        gram_ok[s.name] = grams and (max_gram_bytes is None or s.spec.groups * n * n * 8 <= max_gram_bytes)
    sess = session(with_outputs(model, [s.x for s in active]))
    out_names = [o.name for o in sess.get_outputs()]
    for feed in feeds:
        n = feed_size(feed)
        if obs.first_shapes is None:
            obs.first_shapes = {k: tuple(v.shape) for k, v in feed.items()}
        vals = dict(zip(out_names, sess.run(out_names, feed)))
        for s in active:
            add_input(obs.stats.setdefault(s.name, Stats()), s, vals[s.x], n, gram_ok[s.name])
        del vals
        obs.samples += n
        obs.batches += 1
        if keep_samples and sum(feed_size(b) for b in obs.kept) < keep_samples:
            left = keep_samples - sum(feed_size(b) for b in obs.kept)
            obs.kept.append({k: v[:left] if v.ndim and v.shape[0] == n else v for k, v in feed.items()})
        if progress:
            progress(n)
    for st in obs.stats.values():  # overflowing activations (inf/NaN) make a Gram useless: fit data-free
        g = st.gram
        if g is not None and not all(bool(torch.isfinite(t).all()) for t in (g.gram, g.fourth, g.sum, g.sq_sum)):
            st.gram, st.nonfinite = None, True
    return obs


def perturbation_model(model: onnx.ModelProto, sites: list[Site]) -> tuple[onnx.ModelProto, dict, dict]:
    """A copy where every site's output ``y`` becomes ``y_pre + δ`` (``δ`` a new graph input, any shape);
    ``y_pre`` is an extra output.  Returns the model and ``name → (δ input, y_pre output)``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    types = _elem_types(model, [s.y for s in sites])
    by_output = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            by_output[o] = i
    names = {}
    inserts = []
    for s in sites:
        idx = by_output[s.y]
        pre, delta = f"{s.y}__sp_pre", f"{s.y}__sp_delta"
        node = g.node[idx]
        node.output[list(node.output).index(s.y)] = pre
        inserts.append((idx, onnx.helper.make_node("Add", [pre, delta], [s.y], name=f"{s.y}__sp_perturb")))
        g.input.append(onnx.helper.make_tensor_value_info(delta, types[s.y], None))
        g.output.append(onnx.helper.make_tensor_value_info(pre, types[s.y], None))
        names[s.name] = (delta, pre)
    for idx, node in sorted(inserts, key=lambda t: -t[0]):
        g.node.insert(idx + 1, node)
    return m, names, types


def sensitivity(model: onnx.ModelProto, sites: list[Site], batches: list[dict], probes: int = 1,
                seed: int = 0, progress: Callable[[int, str], None] | None = None) -> dict[str, float]:
    """Output gain of every active site by perturbation (see module docstring)."""
    active = [s for s in sites if s.skip is None]
    if not active or not batches:
        return {}
    m, names, types = perturbation_model(model, active)
    sess = session(m)
    real_out = [o.name for o in model.graph.output]
    rng = np.random.default_rng(seed)
    zero = {}
    for s in active:
        dt = onnx.helper.tensor_dtype_to_np_dtype(types[s.y])
        zero[names[s.name][0]] = np.zeros((1,), dtype=dt)
    gsq = {s.name: 0.0 for s in active}
    fsq = 0.0
    for feed in batches:
        base_out = [n for n in real_out] + [names[s.name][1] for s in active]
        res = sess.run(base_out, {**feed, **zero})
        f0 = [r.astype(np.float64) for r, n in zip(res[:len(real_out)], real_out)
              if np.issubdtype(r.dtype, np.floating)]
        if not f0:
            raise ValueError("the model output has no floating-point tensor to measure sensitivity on")
        fsq += sum(float(np.square(f).sum()) for f in f0)
        ys = dict(zip([s.name for s in active], res[len(real_out):]))
        for s in active:
            y = ys[s.name]
            scale = EPS * math.sqrt(float(np.square(y.astype(np.float64)).sum()) / max(y.size, 1))
            if scale == 0 or not math.isfinite(scale):
                continue
            for _ in range(probes):
                d = (rng.standard_normal(y.shape) * scale).astype(y.dtype)
                out = sess.run(real_out, {**feed, **zero, names[s.name][0]: d})
                fo = [o.astype(np.float64) for o in out if np.issubdtype(o.dtype, np.floating)]
                gsq[s.name] += sum(float(np.square(a - b).sum()) for a, b in zip(fo, f0)) / probes
            if progress:
                progress(1, s.name)
        del ys, res
    if fsq == 0:
        return {s.name: 0.0 for s in active}
    return {n: v / (EPS**2 * fsq) for n, v in gsq.items()}
