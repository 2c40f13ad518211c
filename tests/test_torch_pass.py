"""The PyTorch pass: sp.plan / sp.apply / sp.transform against the original models' outputs."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sketchpass as sp
from sketchpass.calib import GramAccumulator
from sketchpass.fx.match import find_sites
from sketchpass.fx.trace import capture
from sketchpass.saved import PLAN_KEY
from sketchpass.sketch.fit import fit_sketch, relative_error, sketch_materialize
from sketchpass.sketch.random import sketch_matrix


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(32, 32, 3, padding=2, dilation=2, groups=2)
        self.fc1 = nn.Linear(32 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _data(n=4, batch=32, shape=(3, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g) for _ in range(n)]


def _model(seed=0):
    torch.manual_seed(seed)
    return SmallCNN().eval()


def _storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_full_capacity_overrides_reproduce_the_model():
    model = _model()
    calib = _data()
    full = {"c1": 16, "c2": 32, "c3": 16, "fc1": 64, "fc2": 10}
    p = sp.plan(model, sp.Budget(params=10**9), calib=calib, method="svd", overrides=full)
    small = sp.apply(model, p, calib=calib)
    x = _data(1, 8, seed=5)[0]
    with torch.no_grad():
        assert _rel(small(x), model(x)) < 1e-4
    assert all(lp.decision.method == "svd" for lp in p.layers)
    # sketch at full capacity (U1 of rank d_out: m = 2 d_out random signs) is exact too
    full_sk = {"c2": {"method": "sketch", "k": 64}, "fc2": {"method": "sketch", "k": 20}}
    p = sp.plan(model, sp.Budget(params=10**9), calib=calib, method="sketch", overrides=full_sk)
    small = sp.apply(model, p, calib=calib)
    with torch.no_grad():
        assert _rel(small(x), model(x)) < 1e-3


@pytest.mark.parametrize("budget", ["params=0.5", "params=0.25", "flops=0.5", "params=0.4,flops=0.6"])
@pytest.mark.parametrize("method", ["svd", "auto", "sketch"])
def test_budgets_are_met_and_reported(budget, method):
    model = _model()
    calib = _data()
    p = sp.plan(model, budget, calib=calib, method=method)
    b = sp.Budget.parse(budget)
    ach = p.achieved()
    for unit, want in b.to_dict().items():
        assert ach[unit] <= want + 1e-12
    small = sp.apply(model, p, calib=calib)
    n_params = sum(t.numel() for t in small.parameters())
    assert n_params == p.totals["params_after"]  # the report's count is the model's real count
    # the output error the plan measured on its held-out batch is what the model does on that batch
    v = small.sketchpass_plan.verify
    held = calib[-1]  # 4 batches: the last one is held out
    with torch.no_grad():
        out, ref = small(held), model(held)
    assert out.shape == (32, 10)
    assert float((out - ref).square().sum() / ref.square().sum()) == pytest.approx(v["measured"], rel=1e-4)
    text = small.sketchpass_plan.report()
    assert "budget requested" in text and "achieved" in text and "measured" in text


def test_predicted_error_matches_measured_error():
    """For the first factored layer (inputs unchanged by earlier layers) the measured calibration
    error of the refitted layer equals the predicted one up to the Gram shrinkage."""
    model = _model()
    calib = _data(8)
    p = sp.plan(model, sp.Budget(params=10**9), calib=calib, method="svd", overrides={"c2": 6, "fc1": 12},
                shrink=0.0)
    small = sp.apply(model, p, calib=calib, shrink=0.0)
    for name in ("c2",):
        d = small.sketchpass_plan[name].decision
        assert d.measured_error is not None
        assert abs(d.measured_error - d.predicted_error) <= 0.02 * d.predicted_error + 1e-6, (name, d)
    # downstream layers see compressed inputs: their error is measured too
    assert small.sketchpass_plan["fc1"].decision.measured_error > 0


def test_sequential_refit_beats_fitting_on_original_inputs():
    """Sequential refit minimises each layer's error on the inputs the compressed model produces, so the
    compressed model's output error on the calibration data is lower than with layers fitted on the
    original inputs.  (Held-out accuracy is measured by bench/posttrain.py.)"""
    model = _model()
    calib = _data(8)
    p = sp.plan(model, sp.Budget(params=10**9), calib=calib, method="svd",
                overrides={"c2": 4, "c3": 3, "fc1": 8, "fc2": 4})
    refit = sp.apply(model, p, calib=calib)
    plain = sp.apply(model, p, calib=calib, refit=False)
    with torch.no_grad():
        err = lambda m: sum(_rel(m(x), model(x)) for x in calib)  # noqa: E731
        assert err(refit) < 0.95 * err(plain)
    # each refitted layer's measured error accounts for what the layers before it changed
    assert refit.sketchpass_plan["fc2"].decision.measured_error > 0


def test_plan_json_replays_bit_exactly_and_model_is_untouched():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = _data()
    small = sp.transform(model, sp.Budget(params=0.3), calib=calib, method="auto", seed=3)
    s = small.sketchpass_plan.to_json()
    again = sp.apply(model, sp.Plan.from_json(s), calib=calib)
    sd1, sd2 = small.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1 if k != PLAN_KEY)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    # the results hold no tensor of the model they came from (training them cannot change it)
    for result in (small, again):
        assert not _storages(model) & _storages(result)
    d = json.loads(s)
    assert d["seed"] == 3 and d["generator"] == sp.GENERATOR_ID and d["version"] == 2
    layer = d["layers"][1]
    assert {"name", "op", "d_in", "d_out"} <= set(layer["spec"]) and "predicted_error" in layer["decision"]
    assert d["verify"]["measured"] is not None and d["totals"]["measured_output_error"] == d["verify"]["measured"]
    with pytest.raises(ValueError, match="not a sketchpass plan"):
        sp.Plan.from_json("{}")
    with pytest.raises(ValueError, match="plan version 99"):
        sp.Plan.from_json(json.dumps({**d, "version": 99}))
    with pytest.raises(ValueError, match="not valid JSON"):
        sp.Plan.from_json("{")


def test_version_1_plans_are_read_and_replay():
    """A plan written by sketchpass 0.1 (version 1: free-text reasons, a 'skipped' flag, no verify record)
    reads back with typed skip reasons and applies to the model."""
    model = _model()
    calib = _data()
    p = sp.plan(model, sp.Budget(params=0.3), calib=calib, method="svd", ignore=["fc2"])
    d = json.loads(p.to_json())
    d["version"] = 1
    d.pop("verify")
    for ld in d["layers"]:
        dec = ld["decision"]
        dec["skipped"] = dec.pop("skip") in ("depthwise", "unsupported-op")
        ld.pop("correction")
        ld.pop("measured_output_error")
    old = sp.Plan.from_json(json.dumps(d))
    assert old.version == 2 and old["fc2"].decision.skip is sp.SkipReason.IGNORED
    assert [lp.decision.skip for lp in old.layers] == [lp.decision.skip for lp in p.layers]
    small = sp.apply(model, old, calib=calib)
    assert small.sketchpass_plan.achieved()["params"] <= 0.3


def test_output_keeps_the_model_class_and_is_smaller():
    model = _model()
    small = sp.transform(model, sp.Budget(params=0.3), calib=_data(), method="svd")
    assert type(small) is SmallCNN and small is not model
    assert small.sketchpass_plan.capture == "fx"
    assert sum(p.numel() for p in small.parameters()) <= 0.3 * sum(p.numel() for p in model.parameters())


def test_data_free_plan_says_so_and_works():
    model = _model()
    p = sp.plan(model, sp.Budget(params=0.5), calib=None, method="svd")
    assert p.calib is None and any("no calibration data" in n for n in p.notes)
    assert "calibration: none" in p.report()
    small = sp.apply(model, p)
    assert torch.isfinite(small(_data(1)[0])).all()
    with pytest.raises(ValueError, match="a flops budget needs input shapes"):
        sp.plan(model, sp.Budget(flops=0.5), calib=None)
    p = sp.plan(model, sp.Budget(flops=0.5), calib=None, example_inputs=_data(1)[0])
    assert p.achieved()["flops"] <= 0.5


def test_infeasible_budget_names_the_smallest_achievable():
    model = _model()
    with pytest.raises(sp.InfeasibleBudgetError, match="smallest achievable is") as info:
        sp.plan(model, sp.Budget(params=0.01), calib=_data(1))
    # the grid of candidate sizes is named, with the option that makes it finer
    assert "granularity=8; a smaller granularity= adds smaller sizes" in str(info.value)
    with pytest.raises(sp.InfeasibleBudgetError) as info:
        sp.plan(model, sp.Budget(params=0.01), calib=_data(1), granularity=1)
    assert "granularity" not in str(info.value)


def test_bad_options_are_rejected():
    model = _model()
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['grannularity'\]"):
        sp.plan(model, sp.Budget(params=0.5), grannularity=4)
    with pytest.raises(ValueError, match="method must be one of"):
        sp.plan(model, sp.Budget(params=0.5), method="pca")
    with pytest.raises(TypeError, match="expected an nn.Module"):
        sp.plan(42, sp.Budget(params=0.5))
    with pytest.raises(TypeError, match="calib must be a tensor"):
        sp.plan(model, sp.Budget(params=0.5), calib=3.0)
    with pytest.raises(ValueError, match="override for 'c2': size 99 is not valid for svd"):
        sp.plan(model, sp.Budget(params=0.9), calib=_data(1), overrides={"c2": 99})


def test_overrides_precedence_and_ignore():
    model = _model()
    calib = _data(1)
    ov = {"conv2d": 4, "c*": 5, "c3": None}  # op type < name glob < exact name
    p = sp.plan(model, sp.Budget(params=10**9), calib=calib, method="svd", overrides=ov, ignore=["fc2", "Linear"])
    assert p["c1"].decision.rank == 5 and p["c2"].decision.rank == 5
    assert p["c3"].decision.method == "dense" and p["c3"].decision.reason == "kept dense by override"
    assert p["fc1"].decision.reason == "ignored by user ('Linear')"
    assert p["fc2"].decision.reason == "ignored by user ('fc2')"


# --------------------------------------------------------------------------- skip reasons, one each
class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.refl = nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect")
        self.up = nn.ConvTranspose2d(16, 16, 2, stride=2)
        self.tiny = nn.Linear(2, 2)
        self.emb = nn.Embedding(50, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.unused = nn.Linear(16, 16)
        self.big = nn.Linear(16 * 16 * 16, 64)

    def forward(self, x, tokens):
        y = self.up(self.refl(self.dw(x)))
        z = self.head(self.emb(tokens)).mean(1)
        return self.big(y.flatten(1)), z, self.tiny(z[:, :2])


def test_every_skip_reason_is_in_the_plan():
    torch.manual_seed(0)
    model = Zoo().eval()
    calib = [(torch.randn(4, 8, 8, 8), torch.randint(0, 50, (4, 5)))]
    p = sp.plan(model, sp.Budget(params=0.9), calib=calib, method="svd", capture="modules")
    reasons = {lp.spec.name: lp.decision.reason for lp in p.layers}
    assert "depthwise conv" in reasons["dw"]
    assert "padding_mode='reflect'" in reasons["refl"]
    assert "ConvTranspose2d is not supported" in reasons["up"]
    assert "tied weights" in reasons["head"] and "emb.weight" in reasons["head"]
    assert reasons["unused"] == "not executed on the calibration data"
    assert reasons["tiny"] == "no factored form is cheaper than dense in the budget's units"
    assert p["big"].decision.method == "svd"
    text = p.report()
    for r in ("depthwise", "reflect", "tied", "not executed"):
        assert r in text


def test_multihead_attention_projection_is_skipped_in_module_mode():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    p = sp.plan(M().eval(), sp.Budget(params=0.95), calib=[torch.randn(2, 5, 16)], capture="modules", method="svd")
    assert "nn.MultiheadAttention" in p["attn.out_proj"].decision.reason


class Functional(nn.Module):
    """Weights used through F.linear, F.conv2d and matmul (common in hand-written code)."""

    def __init__(self):
        super().__init__()
        self.w_conv = nn.Parameter(torch.randn(16, 4, 3, 3) * 0.2)
        self.b_conv = nn.Parameter(torch.zeros(16))
        self.proj = nn.Parameter(torch.randn(16 * 8 * 8, 32) * 0.02)
        self.out = nn.Linear(32, 8)
        self.w_lin = nn.Parameter(torch.randn(24, 32) * 0.1)

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.w_conv, self.b_conv, stride=1, padding=1))
        h = h.flatten(1) @ self.proj
        return self.out(F.relu(h)) + F.linear(h, self.w_lin)[:, :8]


def test_functional_linear_conv_and_matmul_are_matched_and_rewritten():
    torch.manual_seed(0)
    model = Functional().eval()
    calib = [torch.randn(16, 4, 8, 8) for _ in range(4)]
    cap = capture(model)
    sites = {s.name: s for s in find_sites(cap)}
    assert sites["w_conv"].spec.op == "conv2d" and sites["w_conv"].spec.source == "function"
    assert sites["proj"].spec.source == "matmul" and sites["proj"].spec.d_in == 1024
    assert sites["w_lin"].spec.source == "function"
    full = {"w_conv": 16, "proj": 32, "w_lin": 24, "out": 8}
    small = sp.transform(model, sp.Budget(params=10**9), calib=calib, method="svd", overrides=full)
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        assert _rel(small(x), model(x)) < 1e-4
    small = sp.transform(model, sp.Budget(params=0.4), calib=calib, method="svd")
    assert isinstance(small, torch.fx.GraphModule)  # functional uses are rewritten in the graph
    small.graph.lint()
    assert sum(p.numel() for p in small.parameters()) == small.sketchpass_plan.totals["params_after"]
    assert small.sketchpass_plan.achieved()["params"] <= 0.4


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(20, 40)
        self.b = nn.Linear(40, 30)

    def forward(self, x, scale=None):
        y = self.b(F.relu(self.a(x)))
        return y if scale is None else y * scale


@pytest.mark.parametrize("form", ["tuple", "dict", "dataloader"])
def test_calibration_batches_can_be_tuples_dicts_or_a_dataloader(form):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    xs = torch.randn(64, 20)
    if form == "tuple":
        calib = [(xs[i:i + 16], torch.tensor(2.0)) for i in range(0, 64, 16)]
    elif form == "dict":
        calib = [{"x": xs[i:i + 16], "scale": torch.tensor(2.0)} for i in range(0, 64, 16)]
    else:
        calib = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs), batch_size=16)
    p = sp.plan(model, sp.Budget(params=0.5), calib=calib, method="svd", granularity=2)
    # one batch of the four is held out to measure the output error
    assert p.calib == {"samples": 48, "batches": 3, "holdout_samples": 16, "holdout_batches": 1, "mode": "model",
                       "peak_gram_mb": pytest.approx((21 ** 2 + 41 ** 2) * 8 / 2**20, abs=1e-3)}
    assert p.verify["samples"] == 16 and p.verify["measured"] is not None
    small = sp.apply(model, p, calib=calib)
    assert small.sketchpass_plan.achieved()["params"] <= 0.5
    with torch.no_grad():
        out = small(xs, torch.tensor(2.0)) if form != "dataloader" else small(xs)
        ref = model(xs, torch.tensor(2.0)) if form != "dataloader" else model(xs)
        assert out.shape == ref.shape
        held = small.sketchpass_plan.verify["measured"]  # measured on the held-out quarter of the same data
        assert held / 3 < _rel(out, ref) ** 2 < 3 * held


def test_sensitivity_reflects_how_much_a_layer_matters_at_the_output():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.loud = nn.Linear(32, 16)
            self.quiet = nn.Linear(32, 16)

        def forward(self, x):
            return self.loud(x) + 0.1 * self.quiet(x)

    torch.manual_seed(0)
    model = Branches().eval()
    p = sp.plan(model, sp.Budget(params=0.9), calib=[torch.randn(64, 32)], method="svd", probes=8,
                sensitivity_samples=64, granularity=1)
    ratio = p["loud"].sensitivity / p["quiet"].sensitivity
    assert 50 < ratio < 200  # output share of the two branches: 1 : 0.01 in energy


def test_shrinkage_prevents_overfitting_with_few_samples():
    """A calibrated sketch fit from a Gram of fewer samples than dimensions: with Ledoit–Wolf
    shrinkage it wins on held-out inputs, while the raw Gram wins (by construction) on the
    calibration inputs it was fitted to."""
    g = torch.Generator().manual_seed(0)
    d, m = 96, 32
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -1, d, dtype=torch.float64)
    W = torch.randn(48, d, generator=g, dtype=torch.float64)
    X = torch.randn(40, d, generator=g, dtype=torch.float64) @ mix  # 40 samples < 96 dims
    H = torch.randn(4000, d, generator=g, dtype=torch.float64) @ mix
    acc = GramAccumulator(d)
    acc.add_rows(X)
    raw, shrunk = acc.gram[0], acc.shrunk("auto")[0]
    assert 0.0 < float(acc.ledoit_wolf()[0]) < 1.0
    U1 = torch.from_numpy(sketch_matrix(0, "a", "U1", (m, 48), m))
    U2 = torch.from_numpy(sketch_matrix(0, "a", "U2", (m, d), m))
    C_held = H.T @ H
    errs = {}
    for label, C in (("raw", raw), ("shrunk", shrunk)):
        W_hat = sketch_materialize(*fit_sketch(W, U1, U2, 1, 1, "calibrated", C), U1, U2, 1, 1)
        errs[label] = (relative_error(W, W_hat, C_held), relative_error(W, W_hat, raw))
    assert errs["shrunk"][0] < 0.5 * errs["raw"][0]  # held out: raw Gram overfits badly
    assert errs["raw"][1] < errs["shrunk"][1]  # calibration


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_transformed_model_runs_on_cuda():
    model = _model()
    small = sp.transform(model, sp.Budget(params=0.4), calib=_data(), method="auto").cuda()
    x = _data(1)[0]
    torch.testing.assert_close(small(x.cuda()).cpu(), small.cpu()(x), atol=1e-4, rtol=1e-4)


class _InplaceResidual(nn.Module):
    """In-place ops on values that the two lock-step streams share until the first compressed layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 16, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = self.relu(self.a(x))
        z = self.b(y)
        z += y  # in place on a value computed once for both streams
        z = self.relu(z)
        w = self.c(z)
        z.add_(w)  # in place on a shared value, with a compressed input: the streams must not mix
        return self.head(z.mean((2, 3)))


def test_lockstep_shares_unchanged_values_without_corrupting_in_place_ops():
    torch.manual_seed(0)
    model = _InplaceResidual().eval()
    calib = [torch.randn(8, 4, 12, 12) for _ in range(3)]
    # only the last conv and the head are compressed: everything before them runs once for both streams
    p = sp.plan(model, sp.Budget(params=0.99), calib=calib, overrides={"c": 4, "a": None, "b": None, "head": 6})
    assert any("sensitivities could not be measured" in n for n in p.notes)  # add_ defeats autograd; said so
    fx_small = sp.apply(model, p, calib=calib)
    mod_small = sp.apply(model, dataclasses.replace(p, capture="modules"), calib=calib)
    x = torch.randn(5, 4, 12, 12)
    with torch.no_grad():
        ref, got = model(x), fx_small(x)
        torch.testing.assert_close(got, mod_small(x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(ref, got)  # the layer was really compressed
    lp = fx_small.sketchpass_plan["c"]
    assert lp.decision.method == "svd" and lp.decision.measured_error > 0
    # the layers before it were not touched: their measured errors are exactly zero
    assert all(fx_small.sketchpass_plan[n].decision.measured_error in (None, 0.0) for n in ("a", "b"))


def test_refit_target_is_the_least_squares_solution():
    """The refit target W' minimises ‖W' X̂ - W X‖² (shrinkage off): W' = W M Ĉ⁻¹, from the lean
    W M accumulation; a layer whose inputs did not change gets W' = W exactly."""
    from sketchpass.calib import CrossGramAccumulator
    from sketchpass.sketch.refit import refit_target as _target

    g = torch.Generator().manual_seed(0)
    W = torch.randn(7, 12, generator=g)
    X = torch.randn(200, 12, generator=g)
    Xh = X + 0.3 * torch.randn(X.shape, generator=g)
    acc = CrossGramAccumulator(12, 1, weight=W)
    acc.add_rows(X, Xh)
    W_t, grams, wc = _target(W, acc, 1, 0.0)
    ref = torch.linalg.lstsq(Xh.double(), (X.double() @ W.double().T)).solution.T
    torch.testing.assert_close(W_t, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grams[0], Xh.double().T @ Xh.double(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(wc[0], W_t @ grams[0], rtol=1e-6, atol=1e-6)  # W'Ĉ, handed to the fits
    same = CrossGramAccumulator(12, 1, weight=W)
    same.add_rows(X, X)
    assert torch.equal(_target(W, same, 1, "auto")[0], W.double())


def test_one_rademacher_probe_estimates_the_exact_gain():
    """Default sensitivity (one Rademacher probe per sample) against the exact gain
    g = ‖y‖² Σ_samples ‖J‖²_F / (D ‖f‖²) of a layer whose Jacobian to the output is known (a linear head)."""
    from sketchpass.fx.match import find_sites
    from sketchpass.fx.observe import sensitivity
    from sketchpass.fx.trace import capture

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 7, bias=False)).eval()
    x = torch.randn(256, 12)
    cap = capture(model, "auto", example=x)
    sites = find_sites(cap)
    got = sensitivity(cap.model, sites, [x], seed=1)
    with torch.no_grad():
        y, f = model[0](x), model(x)
        J2 = x.shape[0] * float(model[1].weight.square().sum())  # d f / d y = W2 for every sample
        exact = float(y.square().sum()) * J2 / (y.numel() * float(f.square().sum()))
    name = sites[0].name
    assert abs(got[name] / exact - 1) < 0.05, (got[name], exact)


class _ZeroGammaBlock(nn.Module):
    """A residual block whose last BatchNorm has γ = 0 on ``zeroed`` of its channels (timm's zero-initialised
    last BN when all of them; a channel-pruned network when some)."""

    def __init__(self, c, zeroed):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        with torch.no_grad():
            self.b2.weight[:zeroed] = 0

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


@pytest.mark.parametrize("zeroed", [16, 8])
def test_a_batchnorm_that_zeroes_channels_gives_finite_factors(zeroed):
    """A conv's error is weighed after its BatchNorm; channels the BatchNorm zeroes must not turn its fit into
    0/0: the factors stay finite and the compressed model is measured like any other."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _ZeroGammaBlock(16, zeroed), _ZeroGammaBlock(16, zeroed),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(4, 3, 12, 12))
    model.eval()
    calib = [torch.randn(4, 3, 12, 12) for _ in range(8)]
    small = sp.transform(model, sp.Budget(params=0.6), calib=calib, method="svd", rounds=0,
                         overrides={"1.c2": 4, "2.c2": 4})
    for name in ("1.c2", "2.c2"):
        assert all(bool(torch.isfinite(p).all()) for p in small.get_submodule(name).parameters())
    p = small.sketchpass_plan
    assert math.isfinite(p.verify["measured"]) and p.achieved()["params"] <= 0.6 + 1e-9
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert bool(torch.isfinite(small(x)).all())


def test_a_compressed_model_with_non_finite_outputs_is_refused(monkeypatch):
    import sketchpass.pipeline as pipeline

    real = pipeline.factor_module

    def broken(*a, **k):
        mod = real(*a, **k)
        mod.register_forward_hook(lambda m, i, o: o * float("nan"))
        return mod

    monkeypatch.setattr(pipeline, "factor_module", broken)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with pytest.raises(RuntimeError, match=r"the compressed model's outputs on the held-out batches are not finite "
                                           r"\(measured output error nan\) in round 0 of the verify loop: a "
                                           r"factored layer gives inf/NaN \(first: "):
        sp.transform(model, sp.Budget(params=0.6), calib=[torch.randn(8, 16) for _ in range(8)], method="svd")


class _ParamSliceInput(nn.Module):
    """A module called on a slice of a parameter (DeBERTa-v2: ``LayerNorm(rel_embeddings.weight)``) and a
    data-dependent branch (no fx graph: modules capture)."""

    def __init__(self):
        super().__init__()
        self.rel, self.ln = nn.Embedding(8, 32), nn.LayerNorm(32)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 10)

    def forward(self, x):
        r = self.ln(self.rel.weight[0:4])
        if x.sum() > 1e9:
            x = x * 2
        return self.fc2(torch.relu(self.fc1(x + r.mean(0))))


def test_a_module_called_on_a_parameter_slice_is_counted():
    """torch's FLOP counter hooks the gradients of module inputs that require one and fails on a parameter's slice:
    the MACs are counted with the weights frozen (and the user's model keeps its requires_grad)."""
    torch.manual_seed(0)
    model = _ParamSliceInput().eval()
    small = sp.transform(model, sp.Budget(params=0.8), calib=[torch.randn(2, 32) for _ in range(8)], method="svd")
    p = small.sketchpass_plan
    assert p.achieved()["params"] <= 0.8 + 1e-9 and 0 < p.achieved()["flops"] < 1
    assert math.isfinite(p.verify["measured"])
    assert all(q.requires_grad for q in model.parameters())


class _TorchEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(16, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)))


def test_torch_transformer_encoder_layers_are_factored_and_run():
    """nn.TransformerEncoderLayer in eval mode without autograd calls a fused kernel on linear1/linear2's weights
    instead of the modules (and fx keeps it a leaf): its feed-forward layers must still be seen, factored, and
    run as factored in the compressed model."""
    torch.manual_seed(0)
    model = _TorchEncoder().eval()
    calib = [torch.randn(2, 12, 16) for _ in range(8)]
    small = sp.transform(model, sp.Budget(params=0.7), calib=calib, method="svd", rounds=0,
                         overrides={"enc.layers.0.linear1": 16})
    p = small.sketchpass_plan
    assert p["enc.layers.0.linear1"].decision.method == "svd" and p.achieved()["params"] <= 0.7 + 1e-9
    assert any("nn.TransformerEncoderLayer(s): their fused inference path" in n for n in p.notes)
    assert isinstance(small.enc.layers[0].linear1, sp.LowRankLinear)
    assert small.enc.layers[0].activation_relu_or_gelu is False  # fused path off where a layer is factored
    assert all(layer.activation_relu_or_gelu for layer in model.enc.layers)  # the user's model as it was
    x = torch.randn(3, 12, 16)
    with torch.no_grad():
        out = small(x)
        slow = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            ref = small(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(slow)
        dense = model(x)
    torch.testing.assert_close(out, ref)
    num = float((out - dense).square().sum() / dense.square().sum())
    assert math.isfinite(p.verify["measured"]) and 0 < num


class _PaddedEncoder(nn.Module):
    """nn.TransformerEncoder with its default enable_nested_tensor=True and a padding mask: in inference its layers
    get a nested tensor of the real tokens."""

    def __init__(self, nested=True):
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
        self.head = nn.Linear(32, 10)

    def forward(self, input_ids, attention_mask):
        return self.head(self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0))


def test_a_nested_tensor_transformer_encoder_with_padding_is_compressed():
    """The pass turns the nested-tensor path off in its working copy (the layers then compute every position) and
    in the result where a layer is factored: the plan is the one of the same model built without that path, and at
    the real tokens the result computes what that model's result does."""
    g = torch.Generator().manual_seed(0)
    calib = []
    for _ in range(6):
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[1, 8:] = 0
        mask[2, 5:] = 0
        calib.append({"input_ids": torch.randint(0, 100, (4, 12), generator=g), "attention_mask": mask})
    small = {}
    for nested in (True, False):
        torch.manual_seed(0)
        model = _PaddedEncoder(nested).eval()
        assert model.enc.use_nested_tensor is nested
        small[nested] = sp.transform(model, sp.Budget(params=0.7), calib=calib, method="svd", progress=False)
        assert model.enc.use_nested_tensor is nested  # the user's model as it was
    p, q = small[True].sketchpass_plan, small[False].sketchpass_plan
    assert [lp.decision.size for lp in p.layers] == [lp.decision.size for lp in q.layers]
    assert p.verify["measured"] == pytest.approx(q.verify["measured"], rel=1e-6)
    assert any("chained block by block over the 2 blocks of 'enc.layers'" in n for n in p.notes)
    assert small[True].enc.use_nested_tensor is False
    real = calib[0]["attention_mask"].bool()
    with torch.no_grad():
        a, b = small[True](**calib[0]), small[False](**calib[0])
    torch.testing.assert_close(a[real], b[real], rtol=1e-4, atol=1e-5)
