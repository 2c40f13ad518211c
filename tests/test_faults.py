"""Fault injection: every bad input and fault of ``bench/reliability.py`` (its table is docs/reliability.md) —
one line naming the problem, the expected exit code, nothing written but the case's outputs, no temporary
file or store folder left, every input byte-identical; plus property-based tests of the budget parser, the
override resolver and the plan JSON round trip."""

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import sketchpass as sp  # noqa: E402
from sketchpass.plan import Decision, LayerPlan, LayerSpec, SkipReason  # noqa: E402
from sketchpass.planner import resolve_override  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import reliability  # noqa: E402


@pytest.mark.parametrize("case", reliability.CASES, ids=[c.name for c in reliability.CASES])
def test_bad_input_and_faults(case, tmp_path):
    r = reliability.run_case(case, tmp_path)
    assert r["rc"] == case.rc, r
    assert r["says_expected"], r
    if case.rc != 0:
        assert r["message_lines"] == 1 and r["message"].startswith("sketchpass: "), r
    assert not r["unexpected_files"] and not r["leftovers"] and not r["inputs_changed"], r
    assert r["output_valid"] is not False, r
    if case.name == "calib-uint8-images":
        assert r["notes"] and "uint8, cast to float32" in r["notes"][0]


# --------------------------------------------------------------------------- properties
number = st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(params=st.none() | number, flops=st.none() | number)
def test_budget_text_round_trips(params, flops):
    if params is None and flops is None:
        return
    b = sp.Budget(params=params, flops=flops)
    text = ",".join(f"{k}={v!r}" for k, v in b.to_dict().items())
    assert sp.Budget.parse(text) == b
    assert sp.Budget.parse(text.replace(",", " ; ")) == b


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_budget_parser_refuses_garbage_with_a_value_error(text):
    try:
        b = sp.Budget.parse(text)
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert set(b.to_dict()) <= {"params", "flops"} and all(v > 0 for v in b.to_dict().values())


names = st.from_regex(r"[a-z]{1,4}(\.[a-z0-9]{1,3}){0,2}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(name=names, op_rank=st.integers(1, 9), glob_rank=st.integers(1, 9), exact_rank=st.integers(1, 9),
       which=st.sets(st.sampled_from(["op", "glob", "exact"])))
def test_override_precedence_is_op_type_then_glob_then_exact_name(name, op_rank, glob_rank, exact_rank, which):
    spec = LayerSpec(name, "linear", 16, 16)
    rules = {}
    if "op" in which:
        rules["Linear"] = op_rank
    if "glob" in which:
        rules[name[0] + "*"] = glob_rank
    if "exact" in which:
        rules[name] = exact_rank
    got = resolve_override(spec, "Linear", rules)
    want = exact_rank if "exact" in which else glob_rank if "glob" in which else op_rank if "op" in which else ...
    assert got == want


decisions = st.one_of(
    st.builds(lambda r, e: Decision("svd", rank=r, params=10 * r, macs=10 * r, predicted_error=e),
              st.integers(1, 64), st.floats(0, 10)),
    st.builds(lambda k, l: Decision("sketch", k=k, l=l, params=k, macs=k), st.integers(1, 32), st.integers(1, 3)),
    st.builds(lambda s: Decision("dense", skip=s, reason=f"because {s.value}"), st.sampled_from(list(SkipReason))))


@settings(max_examples=100, deadline=None)
@given(ds=st.lists(decisions, min_size=1, max_size=6), seed=st.integers(0, 2**31))
def test_plan_json_round_trips(ds, seed):
    layers = [LayerPlan(LayerSpec(f"l{i}", "conv2d", 8, 16, (3, 3), (1, 1), (1, 1), (1, 1)), d, 0.5 + i)
              for i, d in enumerate(ds)]
    p = sp.Plan(layers=layers, budget={"params": 0.5}, seed=seed, verify={"measured": 0.1, "rounds": []})
    p.recompute_totals(10_000, 100_000)
    back = sp.Plan.from_json(p.to_json())
    assert back.to_dict() == p.to_dict()
    assert json.loads(back.to_json()) == json.loads(p.to_json())


# --------------------------------------------------------------------------- types kept
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("method", ["svd", "sketch"])
def test_half_precision_torch_models_keep_their_dtype(dtype, method):
    import torch
    from torch import nn

    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(),
                      nn.Linear(32, 10)).eval().to(dt)
    calib = [torch.randn(8, 3, 8, 8).to(dt) for _ in range(4)]
    small = sp.transform(m, "params=0.5", calib=calib, method=method)
    assert {p.dtype for p in small.parameters()} == {dt} and {b.dtype for b in small.buffers()} <= {dt}
    with torch.no_grad():
        out, ref = small(calib[-1]), m(calib[-1])
    assert out.dtype == dt
    measured = small.sketchpass_plan.verify["measured"]
    assert measured == pytest.approx(float((out.float() - ref.float()).square().sum() / ref.float().square().sum()),
                                     rel=1e-2)


def test_bfloat16_onnx_layers_are_kept_dense_with_the_reason():
    import ml_dtypes
    import numpy as np
    import onnx
    import onnx_graphsurgeon as gs
    from onnx import TensorProto, helper, numpy_helper

    import sketchpass.onnx as spx

    W = np.random.default_rng(0).standard_normal((8, 4)).astype(ml_dtypes.bfloat16)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N", 4])],
                          [numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    site = spx.find_sites(gs.import_onnx(m), m)[0]
    assert site.skip is SkipReason.UNSUPPORTED_DTYPE and "bfloat16" in site.detail
    with pytest.raises(sp.InfeasibleBudgetError, match="nothing to compress: found 1 MatMul"):
        sp.plan(m, "params=0.5")
    assert sp.plan(m, "params=1.0")["mm"].decision.skip is SkipReason.UNSUPPORTED_DTYPE


def test_options_and_overrides_from_outside_are_refused_with_one_line():
    import torch
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    calib = [torch.randn(16, 8) for _ in range(2)]
    for bad, match in [({"0": {"rank": 2, "width": 3}}, r"override for '0': unknown keys \['width'\]"),
                       ({"0": "big"}, "expected None, an int size or a dict"),
                       ({"0": {"method": "pca"}}, "method must be 'svd' or 'sketch'"),
                       ({"0": {"method": "svd"}}, "method 'svd' needs 'rank'"),
                       ({"": 3}, "keys must be non-empty strings")]:
        with pytest.raises((ValueError, TypeError), match=match):
            sp.plan(m, "params=0.9", calib=calib, overrides=bad)
    with pytest.raises(TypeError, match="ignore must be layer names"):
        sp.plan(m, "params=0.9", calib=calib, ignore=[3])
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    foreign = sp.plan(other, "params=10000", calib=calib, method="svd", overrides={"0": 2})
    with pytest.raises(ValueError, match=r"layer '0': the plan expects 8→16.*another model"):
        sp.apply(m, foreign, calib=calib)
