"""Find the weight-carrying nodes of an ONNX graph (pattern / check, DESIGN §4).

Patterns, on an onnx-graphsurgeon graph:

* ``Conv`` (1-D and 2-D; any ``group``, ``pads`` — asymmetric too —, ``strides``, ``dilations``,
  ``auto_pad``) with a constant weight ``K`` (``d_out × d_in/g × *kernel``: already the torch layout);
* ``Gemm`` ``Y = α A' B' + β C`` (``A' = A`` or ``Aᵀ`` by ``transA``, ``B' = B`` or ``Bᵀ`` by ``transB``)
  with a constant ``B``: a Linear with torch weight ``W = α B'ᵀ`` (``d_out × d_in``); ``C`` and ``β``
  stay on the last node of the rewrite;
* ``MatMul`` ``y = x W`` with a constant 2-D right operand: a Linear with ``d_in = W.shape[0]`` and
  torch weight ``Wᵀ``.

"Constant" means an initializer, a ``Constant`` node, or any subgraph that depends on neither graph
inputs nor random ops (e.g. ``ConstantOfShape``, ``Transpose`` of an initializer): such subgraphs are
evaluated once with ``onnx.reference``.  Every declined node gets a reason (a
:class:`~sketchpass.plan.SkipReason` with a detail text), including nodes inside ``If``/``Loop``/``Scan``
subgraphs, which are never rewritten.

Layer names follow the torch module path so that a torch plan applies to the model's export: the
weight's name when it is ``<path>.weight``, else the exporter's node scope
(``/encoder/layer.0/attention/self/query/MatMul`` → ``encoder.layer.0.attention.self.query``; the
``dynamo=True`` exporter's ``pkg.torch.onnx.name_scopes`` node metadata, whose nodes are named
``node_MatMul_37`` and whose transposed weights ``val_38``), else the node name, the weight's name or the
output name (made unique).
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from ..plan import LayerSpec, SkipReason
from ..site import Site

OPS = ("Conv", "Gemm", "MatMul")
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
QUANT_OPS = {"DequantizeLinear", "DynamicQuantizeLinear", "QuantizeLinear"}
FLOAT_TYPES = (np.float16, np.float32, np.float64)


@dataclass
class OnnxRef:
    """Where a matched layer sits in the graph: its node, input and output tensor names, Conv geometry or
    Gemm flags, and the name of its weight tensor."""

    node: gs.Node
    kind: str
    x: str = ""
    y: str = ""
    attrs: dict = field(default_factory=dict)
    weight_name: str = ""


# --------------------------------------------------------------------------- names
def scope_path(node_name: str) -> str | None:
    """``/encoder/layer.0/attention/self/query/MatMul`` → ``encoder.layer.0.attention.self.query``;
    ``/features/features.0/Conv`` → ``features.0``.  ``None`` when the name has no scope."""
    if not node_name.startswith("/"):
        return None
    parts = [p for p in node_name.split("/") if p][:-1]  # the last part is the op (``Conv``, ``MatMul_1``)
    if not parts:
        return None
    path = ""
    for p in parts:
        if path and p.startswith(path + "."):
            path = p  # the exporter already wrote the full path of this level
        else:
            path = f"{path}.{p}" if path else p
    return path


def module_scopes(model: onnx.ModelProto) -> dict[str, str]:
    """``{node name: torch module path}`` from the ``pkg.torch.onnx.name_scopes`` metadata that
    ``torch.onnx.export(..., dynamo=True)`` writes on every node (``['', 'encoder', 'encoder.layer.0', ...,
    'encoder.layer.0.attention.self.query', 'linear']``: the last entry is the op, the one before its module)."""
    out = {}
    for node in model.graph.node:
        if node.op_type not in OPS or not node.name:
            continue
        for prop in getattr(node, "metadata_props", ()):
            if prop.key != "pkg.torch.onnx.name_scopes":
                continue
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            if isinstance(scopes, list) and len(scopes) >= 2 and isinstance(scopes[-2], str) and scopes[-2]:
                out[node.name] = scopes[-2]
            break
    return out


def layer_name(node: gs.Node, weight_name: str, scopes: dict[str, str] | None = None) -> str:
    if weight_name.endswith(".weight"):
        return weight_name[: -len(".weight")]
    scoped = scope_path(node.name or "") or (scopes or {}).get(node.name or "")
    if scoped:
        return scoped
    if node.name:
        return node.name
    if weight_name and not weight_name.startswith("onnx::"):
        return weight_name
    return node.outputs[0].name if node.outputs else "layer"


# --------------------------------------------------------------------------- constants
def _producers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.inputs)


def constant_reason(t: gs.Tensor) -> tuple[SkipReason, str] | None:
    """Why ``t`` is not a foldable constant (reason and detail), or ``None``."""
    if isinstance(t, gs.Constant):
        return None
    seen, stack = set(), [t]
    while stack:
        v = stack.pop()
        if id(v) in seen or isinstance(v, gs.Constant):
            continue
        seen.add(id(v))
        prod = _producers(v)
        if not prod:
            return SkipReason.RUNTIME_WEIGHT, "weight is computed at run time (it depends on a graph input)"
        n = prod[0]
        if n.op in RANDOM_OPS:
            return SkipReason.RUNTIME_WEIGHT, f"weight is computed at run time (random op {n.op})"
        if n.op in QUANT_OPS:
            return SkipReason.QUANTIZED, f"quantized weight ({n.op}): not rewritten"
        if any(isinstance(a, gs.Graph) for a in n.attrs.values()):
            return SkipReason.RUNTIME_WEIGHT, f"weight is computed at run time (by {n.op} with a subgraph)"
        stack.extend(n.inputs)
    return None


def fold(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Evaluate the tensors ``names`` of the main graph (all foldable) with ``onnx.reference``:
    the smallest subgraph that produces them, run once."""
    if not names:
        return {}
    g = model.graph
    by_output = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    need_nodes, need_inits, stack, seen = [], set(), list(names), set()
    while stack:
        name = stack.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name in by_output:
            n = by_output[name]
            if id(n) not in {id(x) for x in need_nodes}:
                need_nodes.append(n)
                stack.extend(n.input)
        elif name in inits:
            need_inits.add(name)
    order = {id(n): i for i, n in enumerate(g.node)}
    need_nodes.sort(key=lambda n: order[id(n)])
    sub = onnx.helper.make_graph(need_nodes, "fold", [], [onnx.helper.make_tensor_value_info(n, 0, None)
                                                           for n in names],
                                 initializer=[inits[i] for i in need_inits])
    m = onnx.helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    from onnx.reference import ReferenceEvaluator

    outs = ReferenceEvaluator(m).run(None, {})
    return {n: np.asarray(v) for n, v in zip(names, outs)}


# --------------------------------------------------------------------------- matching
def _ints(v, n, default):
    return tuple(int(a) for a in v) if v is not None else (default,) * n


def _spec(name: str, kind: str, W: np.ndarray, attrs: dict, has_bias: bool) -> LayerSpec:
    if kind == "Conv":
        nd = W.ndim - 2
        g = attrs["group"]
        return LayerSpec(name, f"conv{nd}d", W.shape[1] * g, W.shape[0], tuple(W.shape[2:]), attrs["strides"],
                         attrs["padding"], attrs["dilations"], g, has_bias, source="onnx")
    return LayerSpec(name, "linear", W.shape[1], W.shape[0], bias=has_bias, source="onnx")


def _conv_attrs(node: gs.Node, W: np.ndarray) -> dict:
    nd = W.ndim - 2
    a = node.attrs
    pads = _ints(a.get("pads"), 2 * nd, 0)
    auto = a.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        padding = auto.lower()
    else:
        auto = "NOTSET"
        padding = pads[:nd] if pads[:nd] == pads[nd:] else pads
    return {"group": int(a.get("group", 1)), "strides": _ints(a.get("strides"), nd, 1),
            "dilations": _ints(a.get("dilations"), nd, 1), "pads": pads, "auto_pad": auto, "padding": padding,
            "kernel": tuple(W.shape[2:])}


def _check_weight(kind: str, node: gs.Node, W: np.ndarray) -> tuple[SkipReason, str] | None:
    if "bfloat16" in str(W.dtype):
        return (SkipReason.UNSUPPORTED_DTYPE, "bfloat16 weight: the ONNX pass does not rewrite bfloat16 layers (ONNX "
                "Runtime's CPU provider cannot run them to calibrate or verify); convert the model to float16 or "
                "float32, compress it, then convert back")
    if W.dtype not in FLOAT_TYPES:
        return SkipReason.NOT_FLOAT, f"weight is not floating point ({W.dtype})"
    if kind == "Conv":
        nd = W.ndim - 2
        if nd not in (1, 2):
            return SkipReason.UNSUPPORTED_OP, f"Conv with {nd} spatial dims is not supported (Conv1d/Conv2d only)"
        ks = node.attrs.get("kernel_shape")
        if ks is not None and tuple(ks) != tuple(W.shape[2:]):
            return SkipReason.SHAPE_MISMATCH, f"weight shape does not match kernel_shape {tuple(ks)}"
        if W.shape[1] == 1 and int(node.attrs.get("group", 1)) > 1:
            return (SkipReason.DEPTHWISE,
                    f"depthwise conv (group={node.attrs.get('group')}, one input channel per group): nothing to factor")
    elif W.ndim != 2:
        return (SkipReason.WEIGHT_RANK,
                f"constant weight is {W.ndim}-D, not 2-D (batched MatMul weights are not matched)")
    return None


def _torch_layout(kind: str, node: gs.Node, W: np.ndarray) -> np.ndarray:
    if kind == "Gemm":
        alpha = float(node.attrs.get("alpha", 1.0))
        Wt = W if int(node.attrs.get("transB", 0)) else W.T
        if alpha != 1.0:
            Wt = (Wt.astype(np.float64) * alpha).astype(W.dtype)
        return np.ascontiguousarray(Wt)
    if kind == "MatMul":
        return np.ascontiguousarray(W.T)
    return W


def _subgraph_nodes(graph: gs.Graph, where: str = ""):
    """``(node, where)`` for every node of every subgraph (recursively); ``where`` names the owner."""
    for n in graph.nodes:
        for aname, a in n.attrs.items():
            subs = [a] if isinstance(a, gs.Graph) else [s for s in a if isinstance(s, gs.Graph)] \
                if isinstance(a, list) else []
            for s in subs:
                label = f"the {aname!r} subgraph of {n.op} node {n.name or n.outputs[0].name!r}"
                for sn in s.nodes:
                    yield sn, label
                yield from _subgraph_nodes(s, label)


def find_sites(graph: gs.Graph, model: onnx.ModelProto) -> list[Site]:
    """All Conv/Gemm/MatMul nodes with a constant weight (main graph and subgraphs), in graph order,
    with a skip reason where declined.  Weights computed by constant subgraphs are folded here."""
    candidates = []  # (node, kind, weight tensor, reason, where)
    for node in graph.nodes:
        kind = node.op if node.op in OPS and not node.domain else None
        if kind is None or len(node.inputs) < 2:
            continue
        if kind == "MatMul":
            a, b = node.inputs[0], node.inputs[1]
            ra, rb = constant_reason(a), constant_reason(b)
            if rb is None:
                candidates.append((node, kind, b, None, None))
            elif ra is None:
                candidates.append((node, kind, a, (SkipReason.LEFT_WEIGHT,
                                                   "constant weight on the left (W @ x) is not matched"), None))
            elif not rb[1].endswith("(it depends on a graph input)"):  # e.g. a quantized weight: say why
                candidates.append((node, kind, b, rb, None))
            continue  # activation @ activation: not a weight layer
        w = node.inputs[1]
        candidates.append((node, kind, w, constant_reason(w), None))
    for node, where in _subgraph_nodes(graph):
        if node.op in OPS and len(node.inputs) >= 2 and not node.domain:
            w = node.inputs[1]
            if node.op == "MatMul" and not isinstance(w, gs.Constant):
                continue
            candidates.append((node, node.op, w, (SkipReason.SUBGRAPH, f"inside a subgraph ({where}): not rewritten"),
                               where))

    to_fold = sorted({w.name for _, _, w, r, where in candidates
                      if r is None and where is None and not isinstance(w, gs.Constant)})
    folded = fold(model, to_fold)
    scopes = module_scopes(model)
    sites, names = [], set()
    for node, kind, w, reason, _where in candidates:
        values = None
        if isinstance(w, gs.Constant):
            values = np.asarray(w.values)
        elif w.name in folded:
            values = folded[w.name]
        name = layer_name(node, w.name, scopes)
        base, i = name, 1
        while name in names:
            i += 1
            name = f"{base}_{i}"
        names.add(name)
        x = node.inputs[0].name if kind != "MatMul" or reason is None else node.inputs[1].name
        ref = OnnxRef(node, kind, x=x, y=node.outputs[0].name, weight_name=w.name)
        site = Site(name, LayerSpec(name, kind.lower(), 0, 0, source="onnx"), kind, ref=ref)
        declined_first = reason is not None
        if values is not None:
            if reason is None:
                reason = _check_weight(kind, node, values)
            if values.dtype in FLOAT_TYPES and (kind == "Conv" and values.ndim >= 3 or values.ndim == 2):
                Wt = _torch_layout(kind, node, values) if kind != "MatMul" or not declined_first else values
                attrs = _conv_attrs(node, Wt) if kind == "Conv" else {
                    "transA": int(node.attrs.get("transA", 0)), "beta": float(node.attrs.get("beta", 1.0))}
                has_bias = len(node.inputs) > 2 and not _empty(node.inputs[2])
                site.spec = _spec(name, kind, Wt, attrs, has_bias)
                ref.attrs = attrs
                site.weight = torch.from_numpy(np.array(Wt))
        if reason is None and len(w.outputs) > 1:
            users = [u.name or u.op for u in w.outputs if u is not node]
            reason = (SkipReason.SHARED_WEIGHT,
                      f"weight is shared with {len(users)} other node(s) ({', '.join(users[:3])}); kept dense")
        if reason is None and site.weight is None:
            reason = SkipReason.RUNTIME_WEIGHT, "weight is computed at run time (could not be folded)"
        if reason is not None:
            site.set_skip(*reason)
        sites.append(site)
    return sites


def _empty(t) -> bool:
    return isinstance(t, gs.Variable) and not t.name


# integer weights of quantized layers: op → index of its weight input
QUANT_LAYER_OPS = {"ConvInteger": 1, "MatMulInteger": 1, "QLinearConv": 3, "QLinearMatMul": 3, "DequantizeLinear": 0}


def _is_float(dtype) -> bool:
    return np.dtype(dtype) in FLOAT_TYPES or "bfloat16" in str(dtype)


def weight_stats(graph: gs.Graph, sites: list[Site]) -> tuple[int, int, int]:
    """``(elements, bytes, integer elements)`` of the model's weights: every floating-point initializer and
    Constant-node value (main graph and subgraphs), the integer weights of quantized layers
    (:data:`QUANT_LAYER_OPS`), and the folded weights of matched layers computed by constant subgraphs
    (e.g. ``ConstantOfShape``); each tensor counted once."""
    seen: dict[str, tuple[int, int, bool]] = {}

    def add(key: str, t) -> None:
        n = math.prod(t.shape)
        seen.setdefault(key, (n, n * np.dtype(t.dtype).itemsize, not _is_float(t.dtype)))

    def walk(g: gs.Graph):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant) and _is_float(t.dtype):
                add(t.name or f"#{id(t)}", t)
        for n in g.nodes:
            idx = QUANT_LAYER_OPS.get(n.op)
            if idx is not None and len(n.inputs) > idx:
                w = n.inputs[idx]
                if isinstance(w, gs.Constant) and np.dtype(w.dtype).kind in "iu":
                    add(w.name or f"#{id(w)}", w)
                elif isinstance(w, gs.Variable) and w.inputs and w.inputs[0].op == "Constant":
                    v = w.inputs[0].attrs.get("value")
                    if isinstance(v, gs.Constant) and np.dtype(v.dtype).kind in "iu":
                        add(w.name, v)
            for a in n.attrs.values():
                if n.op == "Constant" and isinstance(a, gs.Constant) and _is_float(a.dtype):
                    add(n.outputs[0].name if n.outputs else f"#{id(a)}", a)
                elif isinstance(a, gs.Graph):
                    walk(a)

    walk(graph)
    for s in sites:
        if s.weight is not None and s.ref.weight_name not in seen:
            seen[s.ref.weight_name] = (s.weight.numel(), s.weight.numel() * s.weight.element_size(), False)
    return (int(sum(v[0] for v in seen.values())), int(sum(v[1] for v in seen.values())),
            int(sum(v[0] for v in seen.values() if v[2])))


def weight_elements(graph: gs.Graph, sites: list[Site]) -> int:
    """The model's parameter count (:func:`weight_stats`)."""
    return weight_stats(graph, sites)[0]


def _all_ops(graph: gs.Graph, out: dict[str, int]) -> dict[str, int]:
    for n in graph.nodes:
        out[n.op] = out.get(n.op, 0) + 1
        for a in n.attrs.values():
            for sg in ([a] if isinstance(a, gs.Graph) else [x for x in a if isinstance(x, gs.Graph)]
                       if isinstance(a, list) else []):
                _all_ops(sg, out)
    return out


def nothing_to_compress(graph: gs.Graph, sites: list[Site]) -> str | None:
    """``None`` when some layer can be factored; else one sentence that counts what the model holds by op
    type and says why none qualifies (and, for quantized models, what to do)."""
    if any(s.skip is None or s.skip.factorable for s in sites):
        return None
    ops = _all_ops(graph, {})
    quant = {op: c for op, c in ops.items() if op in QUANT_LAYER_OPS and op != "DequantizeLinear"}
    parts = []
    by = {}
    for s in sites:
        key = (s.kind, s.skip.value)
        by[key] = by.get(key, 0) + 1
    parts += [f"{c} {kind} ({why})" for (kind, why), c in sorted(by.items())]
    parts += [f"{c} {op} (quantized)" for op, c in sorted(quant.items())]
    if not parts:
        top = ", ".join(f"{op} ×{c}" for op, c in sorted(ops.items(), key=lambda kv: -kv[1])[:6]) or "no nodes"
        return (f"nothing to compress: the model has no Conv, Gemm or MatMul layer with a weight (its ops: {top}); "
                "sketchpass factors convolution and matrix-multiplication weights")
    msg = f"nothing to compress: found {', '.join(parts)}, and none of them can be factored"
    if quant or any(s.skip.value == "quantized" for s in sites):
        msg += "; the weights are quantized — compress the float model first, then quantize the result"
    return msg
