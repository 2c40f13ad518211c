"""Whole-model MACs of an ONNX graph from static shape inference.

The count covers ``Conv``, ``Gemm`` and ``MatMul`` nodes of the main graph (and their quantized forms
``ConvInteger``, ``QLinearConv``, ``MatMulInteger``, ``QLinearMatMul``) (the ops that carry
nearly all the arithmetic of the models we rewrite); element-wise ops, pooling, normalisation and
nodes inside ``If``/``Loop``/``Scan`` subgraphs are not counted.  Per node:
``Conv``: ``N · C_out · prod(out spatial) · C_in/g · prod(kernel)``; ``Gemm``/``MatMul``:
``prod(output shape) · K``.  Shapes come from ``onnx.shape_inference`` on a copy of the model whose
large initializers are replaced by typed graph inputs (so > 2 GB models work too), with the graph
inputs set to the given shapes (the first calibration batch) or to the model's static shapes.
Divided by the batch size (axis 0 of the first input) to give MACs per sample.  Nodes whose shapes
stay unknown are counted as 0 and reported in ``unknown``.
"""

from __future__ import annotations

import math

import onnx

SMALL_INIT = 1 << 16  # initializers up to this many bytes are kept (shape tensors for Reshape etc.)


def skeleton(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """A copy without large tensor data (those initializers become typed inputs), graph inputs reshaped."""
    g = model.graph
    out = onnx.ModelProto()
    out.ir_version = max(model.ir_version, 4)
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    sg = out.graph
    sg.name = g.name
    sg.node.extend(g.node)
    sg.output.extend(g.output)
    sg.value_info.extend(g.value_info)
    init_names = set()
    for t in g.initializer:
        init_names.add(t.name)
        if len(t.raw_data) <= SMALL_INIT and not t.external_data:
            sg.initializer.append(t)
        else:
            sg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for vi in g.input:
        if vi.name in init_names:
            continue
        if input_shapes and vi.name in input_shapes:
            vi = onnx.helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type,
                                                    list(input_shapes[vi.name]))
        sg.input.append(vi)
    return out


def infer_shapes(model: onnx.ModelProto, input_shapes=None) -> dict[str, list]:
    """``tensor name → dims`` (int, or None when unknown) for every tensor shape inference finds."""
    sk = skeleton(model, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(sk, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError, RuntimeError):
        # inference is best effort here: unknown shapes count as unknown (and the plan's notes say so)
        inferred = sk
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                               for d in tt.shape.dim]
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _prod(dims) -> int | None:
    if dims is None or any(d is None for d in dims):
        return None
    return math.prod(dims)


def count_macs(model: onnx.ModelProto, shapes: dict[str, list], batch: int) -> tuple[int, list[str]]:
    """``(MACs per sample, names of nodes whose shapes were unknown)``."""
    total, unknown = 0, []
    conv_w = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
    matmul = ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul")
    for n in model.graph.node:
        if (n.op_type not in conv_w and n.op_type not in matmul) or n.domain not in ("", "ai.onnx"):
            continue
        out = shapes.get(n.output[0])
        macs = None
        if n.op_type in conv_w:
            w = shapes.get(n.input[conv_w[n.op_type]]) if len(n.input) > conv_w[n.op_type] else None
            if out is not None and w is not None and _prod(out) is not None and _prod(w) is not None:
                macs = _prod(out) * _prod(w[1:])  # N·Co·P_out · (Ci/g)·hw
        else:
            a = shapes.get(n.input[0])
            if out is not None and a is not None and _prod(out) is not None and a:
                trans_a = any(at.name == "transA" and at.i for at in n.attribute)
                k = a[0] if (n.op_type == "Gemm" and trans_a) else a[-1]
                if k is not None:
                    macs = _prod(out) * k
        if macs is None:
            unknown.append(n.name or n.output[0])
        else:
            total += macs
    return int(round(total / max(batch, 1))), unknown
