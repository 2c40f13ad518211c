"""Standalone timings for the ONNX frontend (``ort-cpu``, ``ort-cuda``, ``ort-tensorrt``): one layer form at
a time as a one-layer model on the layer's real input shape, and the whole model (see
:mod:`sketchpass.latency.timing`).  The factored forms are emitted by the same code as the real rewrite
(:func:`sketchpass.onnx.rewrite.emit_protos`), from modules of the form's shape with fresh weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import torch

from ..latency import Target, measure
from ..layers import form_module
from ..site import Site
from .rewrite import emit_protos


def session(model: onnx.ModelProto, target: Target):
    import onnxruntime as ort

    from .load import needs_external, save

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = target.threads
    # idle sessions must not spin their thread pools while another one is being timed (on a machine with few
    # cores the spinning threads of one session would slow the other one down)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [target.provider] + (["CPUExecutionProvider"] if target.provider != "CPUExecutionProvider" else [])
    if needs_external(model):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            p = save(model, f"{d}/model.onnx", external_data=True)
            return ort.InferenceSession(str(p), so, providers=providers)
    return ort.InferenceSession(model.SerializeToString(), so, providers=providers)


def _dense_nodes(site: Site, dtype) -> tuple[list, list]:
    """The matched node alone, with its weight (and bias) as initializers."""
    from onnx import helper, numpy_helper

    ref, W = site.ref, site.weight.numpy().astype(dtype)
    node = ref.node
    bias = node.inputs[2].name if len(node.inputs) > 2 and node.inputs[2].name else None
    w_name = f"{site.name}.timing.W"
    if ref.kind == "Conv":
        a = ref.attrs
        attrs = {"group": a["group"], "strides": list(a["strides"]), "dilations": list(a["dilations"]),
                 "kernel_shape": list(a["kernel"])}
        attrs.update({"auto_pad": a["auto_pad"]} if a["auto_pad"] != "NOTSET" else {"pads": list(a["pads"])})
        n = helper.make_node("Conv", [ref.x, w_name] + ([bias] if bias else []), [ref.y], **attrs)
        return [n], [numpy_helper.from_array(W, w_name)]
    if ref.kind == "Gemm":
        n = helper.make_node("Gemm", [ref.x, w_name] + ([bias] if bias else []), [ref.y], transB=1,
                             transA=int(ref.attrs.get("transA", 0)), beta=float(ref.attrs.get("beta", 1.0)))
        return [n], [numpy_helper.from_array(W, w_name)]
    return [helper.make_node("MatMul", [ref.x, w_name], [ref.y])], [numpy_helper.from_array(np.ascontiguousarray(W.T),
                                                                                              w_name)]


def _model(site: Site, nodes, inits, shape, dtype, opset: int) -> onnx.ModelProto:
    from onnx import helper, numpy_helper

    node = site.ref.node
    t = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = list(inits)
    if len(node.inputs) > 2 and node.inputs[2].name:  # the node's own bias / C, referenced by name
        c = node.inputs[2]
        vals = np.asarray(getattr(c, "values", np.zeros(site.spec.d_out)), dtype=dtype)
        inits.append(numpy_helper.from_array(vals, c.name))
    y = helper.make_tensor_value_info(site.ref.y, t, [None] * len(shape))  # same rank, dims left to the runtime
    x = helper.make_tensor_value_info(site.ref.x, t, list(shape))
    g = helper.make_graph(nodes, f"timing_{site.name}", [x], [y], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def form_model(site: Site, method: str, size: int | None, l: int, *, opset: int, storage: str = "float"):
    """The one-layer model a form of ``site`` is timed as, and the module it was emitted from (``None`` for
    the dense node itself): the layer's input, the form's nodes from the real emitter, the layer's output."""
    dtype = site.weight.numpy().dtype
    mod = None
    if method == "dense":
        nodes, inits = _dense_nodes(site, dtype)
    else:
        spec = dataclasses.replace(site.spec, padding=0)  # the module's weights are all the emitter takes
        with torch.no_grad():
            mod = form_module(spec, method, size, l, dtype=torch.float64, name=site.name)
        nodes, inits = emit_protos(site, mod, dtype=dtype, storage=storage, names=set(), opset=opset)
    return _model(site, nodes, inits, site.extra["input_shape"], dtype, opset), mod


def time_forms(site: Site, forms: list[tuple[str, str, int | None, int]], target: Target, *, opset: int,
               storage: str = "float", **kw) -> dict:
    """``{key: Timing}`` of the forms ``(key, method, size, l)`` of ``site``, measured together."""
    dtype = site.weight.numpy().dtype
    x = np.random.default_rng(0).standard_normal(site.extra["input_shape"]).astype(dtype)
    fns = {}
    for key, method, size, l in forms:
        sess = session(form_model(site, method, size, l, opset=opset, storage=storage)[0], target)
        feed = {site.ref.x: x}
        fns[key] = (lambda s=sess, f=feed: s.run(None, f))
    return measure(fns, **kw)


def time_models(models: dict, feed: dict, target: Target, **kw) -> dict:
    """``{key: Timing}`` of whole models on one feed, measured together (interleaved A/B)."""
    fns = {}
    for key, m in models.items():
        sess = session(m, target)
        fns[key] = (lambda s=sess: s.run(None, feed))
    return measure(fns, **kw)
