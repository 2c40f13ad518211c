"""torch → ONNX → sketchpass: a plan made on a PyTorch model applies by name to its ONNX export and the
two compressed models agree numerically; the pretrained MNIST CNN keeps its accuracy in ONNX Runtime."""

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")

import sketchpass as sp  # noqa: E402
import sketchpass.onnx as spx  # noqa: E402


def export(model, example, dynamic=True):
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the TorchScript exporter names nodes and initializers by module path, which is what the layer names
        # are derived from (the dynamo exporter's names: test_torch_plan_applies_to_a_dynamo_export)
        torch.onnx.export(model, (example,), f, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic else None)
    return onnx.load_from_string(f.getvalue())


def ort_run(m, x):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x.numpy()})[0]


class Net(nn.Module):
    """Conv2d (strided, grouped), Conv1d, Linear on 2-D (Gemm) and 3-D (MatMul + Add) inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=2)
        self.conv1d = nn.Conv1d(16, 24, 3, padding=1)
        self.proj = nn.Linear(24, 32)
        self.head = nn.Linear(32 * 16, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.relu(self.conv2(h))  # (N, 16, 4, 4)
        h = h.flatten(2)  # (N, 16, 16)
        h = torch.relu(self.conv1d(h))  # (N, 24, 16)
        h = self.proj(h.transpose(1, 2))  # (N, 16, 32): MatMul + Add
        return self.head(h.flatten(1))  # Gemm


@pytest.mark.parametrize("refit", [True, False])
@pytest.mark.parametrize("method", ["svd", "sketch", "auto"])
def test_torch_plan_applies_to_onnx_export(method, refit):
    """One plan, two frontends: the ONNX pass refits sequentially through ONNX Runtime on the inputs its
    compressed graph produces, as the torch pass does through the fx graph, so the two compressed models
    compute the same function (and measure the same output error on the held-out batch)."""
    torch.manual_seed(0)
    model = Net().eval()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    p = sp.plan(model, sp.Budget(params=0.5), calib=calib, method=method)
    assert sum(lp.decision.method != "dense" for lp in p.layers) >= 2
    small_t = sp.apply(model, p, calib=calib, refit=refit)
    m = export(model, calib[0])
    small_o = spx.apply(m, sp.Plan.from_json(p.to_json()), calib=[{"x": c} for c in calib], refit=refit)
    assert {s.name for s in spx.find_sites(__import__("onnx_graphsurgeon").import_onnx(m), m)} == set(p.names())
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        ref = small_t(x).numpy()
    out = ort_run(small_o, x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    stored = spx.plan_of(small_o)
    assert stored.frontend == "torch" and stored.names() == p.names()
    mt, mo = small_t.sketchpass_plan.verify["measured"], stored.verify["measured"]
    assert mt > 0 and mo == pytest.approx(mt, rel=1e-3)
    for lp in stored.layers:  # per layer too
        if lp.decision.method != "dense":
            assert lp.decision.measured_error == pytest.approx(small_t.sketchpass_plan[lp.spec.name].decision
                                                               .measured_error, rel=1e-3, abs=1e-9)


def test_torch_plan_applies_to_a_dynamo_export(tmp_path):
    """torch.onnx.export(dynamo=True) (onnxscript) names nodes ``node_MatMul_37`` and the transposed weights of
    MatMul ``val_38``: the layers take their names from its ``pkg.torch.onnx.name_scopes`` metadata, so a torch
    plan applies to that export too, to the same function."""
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = Net().eval()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    p = sp.plan(model, sp.Budget(params=0.5), calib=calib, method="svd")
    f = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (calib[0],), str(f), dynamo=True, input_names=["x"], output_names=["y"],
                          dynamic_shapes=({0: torch.export.Dim("N")},), verbose=False)
    m = onnx.load(str(f))
    matmuls = [n for n in m.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(n.name.startswith("node_") for n in matmuls)  # the premise: no scope in the names
    assert {s.name for s in spx.find_sites(__import__("onnx_graphsurgeon").import_onnx(m), m)} == set(p.names())
    small_o = spx.apply(m, sp.Plan.from_json(p.to_json()), calib=[{"x": c} for c in calib])
    small_t = sp.apply(model, p, calib=calib)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        ref = small_t(x).numpy()
    np.testing.assert_allclose(ort_run(small_o, x), ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_onnx_plan_names_match_torch_and_data_free():
    torch.manual_seed(1)
    model = Net().eval()
    m = export(model, torch.randn(2, 3, 8, 8))
    po = spx.plan(m, sp.Budget(params=0.5), calib=None, method="sketch")
    pt = sp.plan(model, sp.Budget(params=0.5), calib=None, method="sketch", example_inputs=torch.randn(1, 3, 8, 8))
    assert po.names() == pt.names()
    small_t = sp.apply(model, pt)
    small_o = spx.apply(m, pt)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = small_t(x).numpy()
    np.testing.assert_allclose(ort_run(small_o, x), ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


@pytest.mark.assets
def test_mnist_cnn_onnx_keeps_accuracy():
    from sketchpass.demo.data import mnist_tensors
    from sketchpass.demo.models import load_mnist_cnn

    model = load_mnist_cnn().eval()
    m = export(model, torch.zeros(1, 1, 28, 28))
    xtr, _ = mnist_tensors("train", n=1024)
    xte, yte = mnist_tensors("test")  # the full 10k test set (the first 2k are harder: dense 98.65%)
    calib = [{"x": b} for b in xtr.split(128)]
    small = spx.transform(m, sp.Budget(params=0.25), calib=calib)
    onnx.checker.check_model(small, full_check=True)
    p = spx.plan_of(small)
    assert p.achieved()["params"] <= 0.25
    s = ort.InferenceSession(small.SerializeToString(), providers=["CPUExecutionProvider"])
    pred = np.concatenate([s.run(None, {"x": b.numpy()})[0].argmax(1) for b in xte.split(1000)])
    assert (pred == yte.numpy()).mean() >= 0.985
