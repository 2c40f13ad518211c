"""The ONNX → ONNX pass: equivalence through ONNX Runtime at full capacity for every op form, node
counts, one negative test per skip reason, metadata, U storage sizes, calibration errors, fp16,
Constant / ConstantOfShape weights, subgraphs, external data."""

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import sketchpass as sp  # noqa: E402
import sketchpass.onnx as spx  # noqa: E402

BIG = sp.Budget(params=10**12)  # no limit: sizes come from overrides
F32 = TensorProto.FLOAT


# --------------------------------------------------------------------------- helpers
def model_of(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def vi(name, shape, t=F32):
    return helper.make_tensor_value_info(name, t, shape)


def init(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


def run(m, feed):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feed)


def feeds(shape, n=3, seed=0, name="x", dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(dtype)} for _ in range(n)]


def conv_model(cin=6, cout=8, k=(3, 3), group=1, bias=True, seed=0, shape=None, **attrs):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((cout, cin // group, *k)).astype(np.float32)
    inputs = ["x", "W"] + (["B"] if bias else [])
    inits = [init("W", W)] + ([init("B", rng.standard_normal(cout).astype(np.float32))] if bias else [])
    node = helper.make_node("Conv", inputs, ["y"], name="conv", group=group, kernel_shape=list(k), **attrs)
    shape = shape or ([2, cin, 9] if len(k) == 1 else [2, cin, 9, 10])
    out = ["N", cout] + [f"s{i}" for i in range(len(shape) - 2)]
    return model_of([node], [vi("x", ["N", cin] + shape[2:])], [vi("y", out)], inits), shape


def full_plan(m, calib, method, name=None):
    """A plan at full capacity for every matched layer (svd: full rank; sketch: m = max(d_in, d_out) per group)."""
    sites = [s for s in spx.find_sites(__import__("onnx_graphsurgeon").import_onnx(m), m) if s.skip is None]
    ov = {}
    for s in sites:
        if method == "svd":
            ov[s.name] = {"method": "svd", "rank": s.spec.max_rank()}
        else:
            g = s.spec.groups
            ov[s.name] = {"method": "sketch", "k": max(s.spec.d_in // g, s.spec.d_out // g) + 2}
    return spx.plan(m, BIG, calib=calib, method=method, overrides=ov, sensitivity_samples=0)


def assert_equiv(m, calib, method, rtol=1e-4, **apply_opts):
    p = full_plan(m, calib, method)
    assert any(lp.decision.method == method for lp in p.layers)
    small = spx.apply(m, p, calib=calib, **apply_opts)
    for feed in calib[:2]:
        ref, out = run(m, feed), run(small, feed)
        for a, b in zip(ref, out):
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * float(np.abs(a).max()))
    return small


def ops(m):
    from collections import Counter

    return Counter(n.op_type for n in m.graph.node)


# --------------------------------------------------------------------------- equivalence per op form
CONV_CASES = {
    "conv2d": {},
    "conv2d_pads": {"pads": [1, 1, 1, 1]},
    "conv2d_asym_pads": {"pads": [0, 1, 2, 1]},
    "conv2d_strided": {"strides": [2, 2], "pads": [1, 1, 1, 1]},
    "conv2d_dilated": {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
    "conv2d_same_upper": {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    "conv2d_same_lower": {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    "conv2d_valid": {"auto_pad": "VALID"},
    "conv2d_grouped": {"group": 2, "pads": [1, 1, 1, 1]},
    "conv1d": {"k": (3,), "pads": [1, 2], "strides": [2]},
    "conv1d_grouped_dilated": {"k": (3,), "group": 2, "dilations": [2]},
    "conv2d_nobias_1x1": {"k": (1, 1), "bias": False},
}


@pytest.mark.parametrize("method", ["svd", "sketch"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_full_capacity(case, method):
    kw = dict(CONV_CASES[case])
    m, shape = conv_model(**kw)
    small = assert_equiv(m, feeds(shape, n=8), method)
    c = ops(small)
    if method == "svd":
        assert c["Conv"] == 2 and c["Add"] == 0
    else:
        assert c["Conv"] == 4 and c["Add"] == 1


def gemm_model(transA=0, transB=0, alpha=1.0, beta=1.0, c_shape=(8,), d_in=6, d_out=8, batch=5):
    rng = np.random.default_rng(1)
    B = rng.standard_normal((d_out, d_in) if transB else (d_in, d_out)).astype(np.float32)
    inits = [init("B", B)]
    inputs = ["x", "B"]
    if c_shape is not None:
        inits.append(init("C", rng.standard_normal(c_shape).astype(np.float32)))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="/fc/Gemm", transA=transA, transB=transB, alpha=alpha,
                            beta=beta)
    xshape = [d_in, batch] if transA else [batch, d_in]
    return model_of([node], [vi("x", xshape)], [vi("y", [batch, d_out])], inits), xshape


@pytest.mark.parametrize("method", ["svd", "sketch"])
@pytest.mark.parametrize("kw", [{}, {"transB": 1}, {"alpha": 0.5, "beta": 2.0}, {"c_shape": None},
                                {"c_shape": (5, 8)}, {"c_shape": (1, 8), "transB": 1}, {"transA": 1}],
                         ids=["plain", "transB", "alpha_beta", "noC", "C_matrix", "C_row", "transA"])
def test_gemm_full_capacity(kw, method):
    m, shape = gemm_model(**kw)
    small = assert_equiv(m, feeds(shape, n=8), method)
    assert ops(small)["Gemm"] == 2
    assert spx.plan_of(small)["fc"].decision.method == method  # named from the node scope /fc/Gemm


@pytest.mark.parametrize("method", ["svd", "sketch"])
@pytest.mark.parametrize("xshape", [[4, 6], [2, 5, 6]], ids=["2d", "3d"])
def test_matmul_full_capacity(xshape, method):
    rng = np.random.default_rng(2)
    W = rng.standard_normal((6, 7)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "enc.q.weight_t"], ["y"], name="/enc/q/MatMul")]
    m = model_of(nodes, [vi("x", ["N"] + xshape[1:])], [vi("y", ["N"] + xshape[1:-1] + [7])],
                 [init("enc.q.weight_t", W)])
    small = assert_equiv(m, feeds(xshape, n=6), method)
    assert ops(small)["MatMul"] == 2
    assert spx.plan_of(small).names() == ["enc.q"]


def test_weight_name_gives_layer_name():
    m, _ = conv_model()
    m.graph.initializer[0].name = "features.0.weight"
    m.graph.node[0].input[1] = "features.0.weight"
    p = spx.plan(m, sp.Budget(params=0.9), calib=None)
    assert p.names() == ["features.0"]


# --------------------------------------------------------------------------- reduced capacity
def test_reduced_capacity_error_matches_prediction():
    m, shape = conv_model(cin=16, cout=32, k=(3, 3))
    calib = feeds([4, 16, 9, 10], n=6)
    p = spx.plan(m, sp.Budget(params=10**12), calib=calib, method="svd", overrides={"conv": 8},
                 sensitivity_samples=0)
    small = spx.apply(m, p, calib=calib)
    lp = spx.plan_of(small)["conv"]
    assert lp.decision.rank == 8 and 0 < lp.decision.measured_error < 1
    # measured on the calibration outputs (bias removed): close to the Gram-measured error
    B = numpy_helper.to_array(m.graph.initializer[1]).reshape(1, -1, 1, 1)
    num = den = 0.0
    for f in calib:
        a, b = run(m, f)[0] - B, run(small, f)[0] - B
        num += float(np.square(b - a).sum())
        den += float(np.square(a).sum())
    assert num / den == pytest.approx(lp.decision.measured_error, rel=0.05)


# --------------------------------------------------------------------------- skip reasons
def skip_of(m, name=None):
    import onnx_graphsurgeon as gs

    sites = spx.find_sites(gs.import_onnx(m), m)
    return {s.name: s.skip for s in sites}


def detail_of(m):
    import onnx_graphsurgeon as gs

    return {s.name: s.detail for s in spx.find_sites(gs.import_onnx(m), m)}


R = sp.SkipReason


def test_skip_runtime_weight():
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c", kernel_shape=[1, 1])
    m = model_of([node], [vi("x", [1, 2, 3, 3]), vi("w", [2, 2, 1, 1])], [vi("y", [1, 2, 3, 3])])
    assert skip_of(m)["c"] is R.RUNTIME_WEIGHT and "computed at run time" in detail_of(m)["c"]


def test_skip_left_constant_matmul():
    node = helper.make_node("MatMul", ["W", "x"], ["y"], name="mm")
    m = model_of([node], [vi("x", [3, 4])], [vi("y", [5, 4])], [init("W", np.ones((5, 3), np.float32))])
    assert skip_of(m)["mm"] is R.LEFT_WEIGHT and "constant weight on the left" in detail_of(m)["mm"]


def test_skip_batched_matmul_weight():
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    m = model_of([node], [vi("x", [2, 3, 4])], [vi("y", [2, 3, 5])], [init("W", np.ones((2, 4, 5), np.float32))])
    assert skip_of(m)["mm"] is R.WEIGHT_RANK and "3-D, not 2-D" in detail_of(m)["mm"]


def test_skip_conv3d():
    m, _ = conv_model(k=(1, 1, 1), shape=[1, 6, 3, 3, 3])
    assert skip_of(m)["conv"] is R.UNSUPPORTED_OP and "3 spatial dims" in detail_of(m)["conv"]


def test_skip_depthwise():
    m, _ = conv_model(cin=4, cout=4, group=4)
    assert skip_of(m)["conv"] is R.DEPTHWISE and "depthwise" in detail_of(m)["conv"]


def test_skip_shared_weight():
    W = init("W", np.ones((4, 4), np.float32))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="a"), helper.make_node("MatMul", ["h", "W"], ["y"],
                                                                                       name="b")]
    m = model_of(nodes, [vi("x", [2, 4])], [vi("y", [2, 4])], [W])
    s = skip_of(m)
    assert s["a"] is R.SHARED_WEIGHT and s["b"] is R.SHARED_WEIGHT and "shared" in detail_of(m)["a"]
    small = spx.transform(m, sp.Budget(params=1.0), calib=None)  # nothing to factor: the budget is met as is
    np.testing.assert_allclose(run(small, {"x": np.ones((2, 4), np.float32)})[0], 16.0)


def test_skip_inside_if_subgraph():
    W = init("Wsub", np.ones((4, 3), np.float32))
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "Wsub"], ["t"], name="inner")], "then", [],
                               [vi("t", [2, 3])], initializer=[W])
    else_g = helper.make_graph([helper.make_node("Identity", ["z"], ["e"])], "else", [], [vi("e", [2, 3])])
    nodes = [helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
             helper.make_node("MatMul", ["x", "W2"], ["z"], name="outer")]
    m = model_of(nodes[::-1], [vi("x", [2, 4]), vi("c", [], TensorProto.BOOL)], [vi("y", [2, 3])],
                 [init("W2", np.ones((4, 3), np.float32))])
    s = skip_of(m)
    assert s["inner"] is R.SUBGRAPH and "inside a subgraph" in detail_of(m)["inner"] and s["outer"] is None
    p = spx.plan(m, sp.Budget(params=10**12), calib=None, overrides={"outer": 2})
    small = spx.apply(m, p)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(run(small, {"x": x, "c": np.array(True)})[0], run(m, {"x": x, "c": np.array(True)})[0],
                               rtol=1e-5)
    assert any("inside a subgraph" in n for n in p.notes)
    # the sequential refit runs the graph in segments: the If's branches read x and z from the outer scope
    calib = [{"x": np.random.default_rng(i).standard_normal((2, 4)).astype(np.float32), "c": np.array(i % 2 == 0)}
             for i in range(4)]
    full = spx.transform(m, sp.Budget(params=10**12), calib=calib, overrides={"outer": 3})
    for c in (True, False):
        np.testing.assert_allclose(run(full, {"x": x, "c": np.array(c)})[0], run(m, {"x": x, "c": np.array(c)})[0],
                                   rtol=1e-4, atol=1e-5)
    assert spx.plan_of(full).verify["measured"] < 1e-8


def test_skip_integer_weight():
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    m = model_of([node], [vi("x", [2, 3], TensorProto.INT32)], [vi("y", [2, 4], TensorProto.INT32)],
                 [init("W", np.ones((3, 4), np.int32))])
    assert skip_of(m)["mm"] is R.NOT_FLOAT and "not floating point" in detail_of(m)["mm"]


def test_skip_quantized_weight():
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"]),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    m = model_of(nodes, [vi("x", [2, 3])], [vi("y", [2, 4])],
                 [init("Wq", np.ones((3, 4), np.int8)), init("s", np.float32(0.1)), init("z", np.int8(0))])
    assert skip_of(m)["mm"] is R.QUANTIZED and "quantized weight" in detail_of(m)["mm"]


def test_skip_kernel_shape_mismatch():
    m, _ = conv_model()
    for a in m.graph.node[0].attribute:
        if a.name == "kernel_shape":
            a.ints[:] = [5, 5]
    assert skip_of(m)["conv"] is R.SHAPE_MISMATCH and "does not match kernel_shape" in detail_of(m)["conv"]


def test_ignore_by_user():
    m, shape = conv_model()
    p = spx.plan(m, sp.Budget(params=1.0), calib=None, ignore=["conv"])
    assert p["conv"].decision.skip is R.IGNORED and p["conv"].decision.reason.startswith("ignored by user")


# --------------------------------------------------------------------------- weights from constants
def test_constant_node_and_constant_of_shape_weights():
    rng = np.random.default_rng(3)
    W1 = rng.standard_normal((6, 5)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W1"], value=numpy_helper.from_array(W1)),
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="/a/MatMul"),
        helper.make_node("ConstantOfShape", ["shape"], ["W2"], value=numpy_helper.from_array(np.array([0.5],
                                                                                                       np.float32))),
        helper.make_node("Transpose", ["W2"], ["W2t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "W2t"], ["y"], name="/b/MatMul"),
    ]
    m = model_of(nodes, [vi("x", ["N", 6])], [vi("y", ["N", 4])], [init("shape", np.array([4, 5], np.int64))])
    s = skip_of(m)
    assert s == {"a": None, "b": None}
    calib = feeds([4, 6], n=4)
    assert_equiv(m, calib, "svd")
    assert_equiv(m, calib, "sketch")
    p = spx.plan(m, sp.Budget(params=0.9), calib=None)
    assert p.totals["params_before"] == 30 + 20  # the folded ConstantOfShape weight counts as params


# --------------------------------------------------------------------------- fp16
@pytest.mark.parametrize("method", ["svd", "sketch"])
def test_fp16_weights(method):
    rng = np.random.default_rng(4)
    W = rng.standard_normal((8, 6, 3, 3)).astype(np.float16)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    m = model_of([node], [vi("x", ["N", 6, 7, 7], TensorProto.FLOAT16)], [vi("y", ["N", 8, 7, 7], TensorProto.FLOAT16)],
                 [init("W", W)])
    calib = feeds([4, 6, 7, 7], n=4, dtype=np.float16)
    small = assert_equiv(m, calib, method, rtol=2e-2)
    assert all(t.data_type in (TensorProto.FLOAT16, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT64)
               for t in small.graph.initializer)


# --------------------------------------------------------------------------- U storage
def _sketch_mlp(d=256, h=512, seed=5):
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], name="/fc1/Gemm", transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["y"], name="/fc2/Gemm", transB=1)]
    inits = [init("fc1.weight", rng.standard_normal((h, d)).astype(np.float32) / 8),
             init("fc1.bias", np.zeros(h, np.float32)),
             init("fc2.weight", rng.standard_normal((d, h)).astype(np.float32) / 8),
             init("fc2.bias", np.zeros(d, np.float32))]
    return model_of(nodes, [vi("x", ["N", d])], [vi("y", ["N", d])], inits)


def test_u_storage_outputs_agree_and_sizes_shrink():
    m = _sketch_mlp()
    calib = feeds([32, 256], n=4)
    p = spx.plan(m, sp.Budget(params=0.5), calib=calib, method="sketch")
    outs, sizes = {}, {}
    for st in spx.U_STORAGE:
        small = spx.apply(m, p, calib=calib, u_storage=st)
        outs[st] = run(small, calib[0])[0]
        sizes[st] = len(small.SerializeToString())
    np.testing.assert_allclose(outs["int8"], outs["float"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs["bits"], outs["float"], rtol=1e-5, atol=1e-6)
    assert sizes["bits"] < sizes["int8"] < sizes["float"]
    eff = 4 * p.totals["params_after"]
    assert abs(sizes["bits"] - eff) / eff < 0.10  # the compact file tracks the effective parameters


def test_u_storage_gaussian_needs_float():
    m = _sketch_mlp()
    p = spx.plan(m, sp.Budget(params=0.5), calib=None, method="sketch", dist="gaussian")
    spx.apply(m, p, u_storage="float")
    with pytest.raises(ValueError, match="u_storage"):
        spx.apply(m, p, u_storage="bits")
    with pytest.raises(ValueError, match="u_storage must be one of"):
        spx.apply(m, p, u_storage="packed")


# --------------------------------------------------------------------------- output model properties
def test_output_model_properties_and_metadata(tmp_path):
    m = _sketch_mlp()
    m.metadata_props.add(key="author", value="me")
    before = m.SerializeToString()
    path = tmp_path / "in.onnx"
    spx.save(m, path)
    stat = os.stat(path)
    calib = feeds([8, 256], n=2)
    small = spx.transform(str(path), sp.Budget(params=0.5), calib=calib)
    assert m.SerializeToString() == before and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    onnx.checker.check_model(small, full_check=True)
    assert [(i.name, i.type) for i in small.graph.input] == [(i.name, i.type) for i in m.graph.input]
    assert [(o.name, o.type) for o in small.graph.output] == [(o.name, o.type) for o in m.graph.output]
    meta = {e.key: e.value for e in small.metadata_props}
    assert meta["author"] == "me"
    p = sp.Plan.from_json(meta[spx.PLAN_KEY])
    assert p.frontend == "onnx" and p.achieved()["params"] <= 0.5
    used = {i for n in small.graph.node for i in n.input}
    assert all(t.name in used for t in small.graph.initializer)  # unused initializers removed
    assert {"fc1.weight", "fc2.weight"}.isdisjoint({t.name for t in small.graph.initializer} - used)
    # the same API through sketchpass.plan/apply
    p2 = sp.plan(m, sp.Budget(params=0.5), calib=calib)
    assert isinstance(sp.apply(m, p2, calib=calib), onnx.ModelProto)


def test_shared_bias_stays_shared():
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "W1", "B"], ["h"], name="c1", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["h", "W2", "B"], ["y"], name="c2", kernel_shape=[1, 1])]
    inits = [init("W1", rng.standard_normal((8, 8, 1, 1)).astype(np.float32)),
             init("W2", rng.standard_normal((8, 8, 1, 1)).astype(np.float32)), init("B", np.ones(8, np.float32))]
    m = model_of(nodes, [vi("x", ["N", 8, 4, 4])], [vi("y", ["N", 8, 4, 4])], inits)
    small = assert_equiv(m, feeds([2, 8, 4, 4], n=4), "svd")
    assert sum(t.name == "B" for t in small.graph.initializer) == 1
    assert sum("B" in n.input for n in small.graph.node) == 2


# --------------------------------------------------------------------------- calibration input
def test_calib_wrong_names_and_shapes():
    m, shape = conv_model()
    with pytest.raises(ValueError, match=r"wrong input names.*x: float32 \[N, 6, 9, 10\]"):
        spx.plan(m, sp.Budget(params=0.5), calib=[{"input": np.zeros(shape, np.float32)}])
    with pytest.raises(ValueError, match=r"has shape \[2, 5, 9, 10\].*expects x: float32 \[N, 6, 9, 10\]"):
        spx.plan(m, sp.Budget(params=0.5), calib=[{"x": np.zeros([2, 5, 9, 10], np.float32)}])
    # integers for a float input are cast (the plan says so once); NaN / inf are refused, naming the input
    ints = [{"x": np.random.default_rng(i).integers(0, 255, shape)} for i in range(3)]
    p = spx.plan(m, sp.Budget(params=0.5), calib=ints)
    assert sum("given as int64, cast to float32" in n for n in p.notes) == 1
    bad = np.zeros(shape, np.float32)
    bad[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    with pytest.raises(ValueError, match=r"calibration batch 1: input 'x' has 3 NaN or inf value\(s\)"):
        spx.plan(m, sp.Budget(params=0.5), calib=[{"x": np.ones(shape, np.float32)}, {"x": bad}])


def test_calib_npz_and_dynamic_width(tmp_path):
    m, _ = conv_model()
    m.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    rng = np.random.default_rng(0)
    varying = [{"x": rng.standard_normal((2, 6, 9, w)).astype(np.float32)} for w in (8, 10, 13)]
    p = spx.plan(m, sp.Budget(params=0.7), calib=varying)
    assert {k: p.calib[k] for k in ("samples", "batches", "holdout_samples", "holdout_batches")} == {
        "samples": 4, "batches": 2, "holdout_samples": 2, "holdout_batches": 1}
    assert p.calib["mode"] == "model" and p.calib["peak_gram_mb"] > 0  # ONNX graphs are calibrated whole
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.standard_normal((10, 6, 9, 10)).astype(np.float32))
    p2 = spx.plan(m, sp.Budget(params=0.7), calib=str(path), batch_size=4)
    assert {k: p2.calib[k] for k in ("samples", "batches", "holdout_samples", "holdout_batches")} == {
        "samples": 8, "batches": 2, "holdout_samples": 2, "holdout_batches": 1}
    small = spx.apply(m, p2, calib=str(path), batch_size=4)
    a, b = run(m, varying[2])[0], run(small, varying[2])[0]  # another width than the calibration data
    assert a.shape == b.shape and 0 < float(np.square(b - a).sum() / np.square(a).sum()) < 0.5
    with pytest.raises(ValueError, match="does not exist"):
        spx.plan(m, sp.Budget(params=0.7), calib=str(tmp_path / "missing.npz"))


def test_data_free_notes_and_macs():
    m, _ = conv_model()  # dynamic batch, static spatial dims
    p = spx.plan(m, sp.Budget(params=0.7), calib=None)
    assert any("no calibration data" in n for n in p.notes)
    assert p["conv"].spec.p_out == 7 * 8 and p.totals["macs_before"] == 8 * 6 * 9 * 7 * 8
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    p = spx.plan(m, sp.Budget(params=0.7), calib=None)
    assert any("one position per sample" in n for n in p.notes)


def test_sensitivity_by_perturbation():
    m = _sketch_mlp()
    p = spx.plan(m, sp.Budget(params=0.5), calib=feeds([8, 256], n=2), sensitivity_samples=8, probes=2)
    sens = [lp.sensitivity for lp in p.layers]
    assert all(s > 0 for s in sens) and len(set(sens)) == 2


# --------------------------------------------------------------------------- load / save
def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        spx.load(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(ValueError, match="bad.onnx.*not a valid ONNX model"):
        spx.load(bad)
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        spx.plan(str(bad), sp.Budget(params=0.5))


def test_save_external_data_roundtrip(tmp_path):
    m = _sketch_mlp()
    p = tmp_path / "ext.onnx"
    spx.save(m, p, external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    assert os.path.getsize(p) < 4096 < os.path.getsize(tmp_path / "ext.onnx.data")
    back = spx.load(p)
    feed = feeds([3, 256], n=1)[0]
    np.testing.assert_array_equal(run(back, feed)[0], run(m, feed)[0])
    small = spx.transform(p, sp.Budget(params=0.5), calib=feeds([8, 256], n=2))
    spx.save(small, tmp_path / "small.onnx")
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind
    onnx.checker.check_model(str(tmp_path / "small.onnx"), full_check=True)
