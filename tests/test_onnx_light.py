"""The onnx package's light models (``onnx/backend/test/data/light``: opset 9, IR 3, weights computed by
``ConstantOfShape``, initializers listed as graph inputs) plan, rewrite, pass the full checker and run
in ONNX Runtime.  The three with 4096-wide fully connected layers (alexnet, zfnet512, vgg19) are planned
data-free: their time goes into the eigendecompositions of those layers (about 55 s, 55 s and 90 s on
2 cores)."""

import glob
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")

import sketchpass as sp  # noqa: E402
import sketchpass.onnx as spx  # noqa: E402
from sketchpass.onnx.feeds import graph_inputs  # noqa: E402

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
NAMES = sorted(os.path.basename(f)[len("light_"):-len(".onnx")] for f in glob.glob(f"{LIGHT}/light_*.onnx"))
assert len(NAMES) >= 9, f"the onnx package's light models were not found under {LIGHT}"
DATA_FREE = {"bvlc_alexnet", "zfnet512", "vgg19"}  # 25088/9216-wide FC inputs: Grams would dominate


def _feed(m, seed=0):
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d if isinstance(d, int) and d > 0 else 1 for d in i.shape]).astype(i.dtype)
            for i in graph_inputs(m)}


@pytest.mark.parametrize("name", NAMES)
def test_light_model_rewrites_and_runs(name):
    path = f"{LIGHT}/light_{name}.onnx"
    m = spx.load(path)
    calib = [_feed(m, 0)] if name not in DATA_FREE else None
    p = spx.plan(path, sp.Budget(params=0.5), calib=calib, method="svd")
    assert p.achieved()["params"] <= 0.5 + 1e-9
    assert sum(lp.decision.method != "dense" for lp in p.layers) >= 1
    small = spx.apply(path, p, calib=calib)  # apply runs the full checker
    feed = _feed(m, 1)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    out = ort.InferenceSession(small.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert [o.shape for o in out] == [r.shape for r in ref]
    # placeholder weights (one constant per tensor) are rank one: every factored form reproduces them
    for o, r in zip(out, ref):
        assert np.isfinite(r).all()
        np.testing.assert_allclose(o, r, rtol=1e-3, atol=1e-6)
    # the real inputs are kept; IR 3 initializer-inputs of weights that were replaced are gone
    assert [(i.name, i.shape) for i in graph_inputs(small)] == [(i.name, i.shape) for i in graph_inputs(m)]
