"""The output-error metric (``metric=``): the KL divergence and its probes as pure math; the sensitivities
under KL against perturbations measured through the model; predicted against measured KL in the pipeline,
for a PyTorch classifier, a Hugging Face decoder (where it is the default) and an ONNX export."""

import io
import warnings

import pytest
import torch
from torch import nn

import sketchpass as sp
import sketchpass.fx.observe as fo
from sketchpass.fx.frontend import TorchFrontend
from sketchpass.metric import KL, Metric, metric
from sketchpass.options import Options
from sketchpass.report import verify_lines


# --------------------------------------------------------------------------- pure math
def test_kl_pair_is_the_mean_kl_per_position():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    num, den = KL().pair(a, b)
    p, q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    want = float((p * (p.log() - q.log())).sum())
    assert den == 15 and num == pytest.approx(want, rel=1e-12)
    assert KL().pair(a, a + 3.0)[0] == pytest.approx(0.0, abs=1e-12)  # a shift of all logits costs nothing
    assert Metric().pair(a, a + 3.0)[0] == pytest.approx(9.0 * a.numel(), rel=1e-6)  # the squared error counts it


def test_padded_positions_are_not_counted(monkeypatch):
    """With a token mask, an output with a token axis counts at its real tokens only (numerator, denominator,
    probes, scale), under both metrics; an output without one (a pooled embedding) is counted whole; the KL of a
    long batch is summed in chunks, to the same value."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    for m in (KL(), Metric()):
        num, den = m.pair(a, b, mask)
        assert (num, den) == pytest.approx(m.pair(a[mask], b[mask]), rel=1e-12)
        assert m.scale(a, mask) == pytest.approx(m.scale(a[mask]), rel=1e-12)
        assert m.errors([a], [b], mask) == pytest.approx((num, den), rel=1e-12)
        assert m.denominator([a], mask) == pytest.approx(den, rel=1e-12)
        v = m.probe(a, torch.Generator().manual_seed(1), mask)
        assert bool((v[~mask] == 0).all()) and bool((v[mask] != 0).any())
        pooled = a[:, 0]
        assert m.pair(pooled, b[:, 0], mask) == m.pair(pooled, b[:, 0])
    assert KL().pair(a, b, mask)[1] == 9
    whole = KL().pair(a, b)
    monkeypatch.setattr(KL, "CHUNK", 14)  # two positions per chunk
    assert KL().pair(a, b) == pytest.approx(whole, rel=1e-12)


def test_kl_probe_covariance_is_the_softmax_fisher():
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0])
    p = torch.softmax(logits.double(), -1)
    g = torch.Generator().manual_seed(1)
    vs = KL().probe(logits.expand(40000, 4).contiguous(), g).double()
    cov = vs.T @ vs / vs.shape[0]
    fisher = torch.diag(p) - torch.outer(p, p)
    assert torch.allclose(vs.sum(-1), torch.zeros(40000, dtype=torch.float64), atol=1e-6)  # Σ_k v_k = 0
    assert torch.allclose(cov, fisher, atol=6e-3)
    # a small logit change: KL ≈ ½ δᵀ F δ, the form the probes estimate
    d = torch.tensor([0.01, -0.02, 0.005, 0.0], dtype=torch.float64)
    assert KL().pair(logits, logits + d)[0] == pytest.approx(0.5 * float(d @ fisher.to(d) @ d), rel=2e-2)


def test_metric_names_and_refusals():
    assert metric("mse").name == "mse" and metric("kl").name == "kl"
    with pytest.raises(ValueError, match="metric must be one of"):
        metric("auto")
    with pytest.raises(ValueError, match=r"metric must be one of \('auto', 'mse', 'kl'\), got 'ce'"):
        Options(metric="ce")
    with pytest.raises(ValueError, match=r"logits over its last axis.*shapes \[\(\), \(4, 1\)\].*metric='mse'"):
        KL().outputs([torch.zeros(()), torch.zeros(4, 1)])
    logits = torch.zeros(2, 3, 5)
    assert KL().outputs([torch.tensor(2.3), logits])[0] is logits  # a loss first (labels in the batch)


# --------------------------------------------------------------------------- sensitivity under KL
class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(24, 48)
        self.b = nn.Linear(48, 48)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x))))) * 3.0


def _classifier():
    torch.manual_seed(0)
    return Classifier().eval()


def test_kl_sensitivity_predicts_the_kl_of_a_small_perturbation():
    """g_i · e for a small isotropic perturbation of relative size e of each layer's output is the mean KL
    that perturbation causes (averaged over many draws)."""
    model = _classifier()
    x = torch.randn(256, 24, generator=torch.Generator().manual_seed(2))
    fe = TorchFrontend(model, Options(metric="kl", capture="modules"))
    fe.prepare(x)
    sites = [s for s in fe.sites() if s.skip is None]
    sens = fo.sensitivity(fe.cap.model, sites, [x], probes=64, seed=0, metric=KL())
    with torch.no_grad():
        ref = model(x)
    e = 1e-4
    for s in sites:
        mod = model.get_submodule(s.name)
        kls = []
        for k in range(32):
            gen = torch.Generator().manual_seed(100 + k)

            def hook(m, i, y, gen=gen):
                rms = y.square().mean().sqrt()
                return y + torch.randn(y.shape, generator=gen) * rms * e ** 0.5

            h = mod.register_forward_hook(hook)
            try:
                with torch.no_grad():
                    num, den = KL().pair(ref, model(x))
            finally:
                h.remove()
            kls.append(num / den)
        measured = sum(kls) / len(kls)
        assert sens[s.name] * e == pytest.approx(measured, rel=0.25), s.name


# --------------------------------------------------------------------------- the pipeline under KL
def _batches(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 24, generator=g) for _ in range(n)]


def test_classifier_predicted_and_measured_kl_agree():
    model = _classifier()
    data = _batches()
    small = sp.transform(model, sp.Budget(params=0.5), calib=data, method="svd", metric="kl", rounds=0,
                         granularity=2)
    p = small.sketchpass_plan
    assert p.options["metric"] == "kl" and p.achieved()["params"] <= 0.5
    v = p.verify
    assert v["measured"] > 0 and 1 / 3 < v["ratio"] < 3
    # the measured number is the mean KL of the held-out batch (one in 8: the last)
    with torch.no_grad():
        num, den = KL().pair(model(data[-1]), small(data[-1]))
    assert v["measured"] == pytest.approx(num / den, rel=1e-6)
    assert "output error (mean KL, nats per position): predicted" in verify_lines(p)[0]
    # applying the plan counts the error as the plan did
    again = sp.apply(model, p, calib=data)
    assert again.sketchpass_plan.options["metric"] == "kl"
    assert again.sketchpass_plan.verify["measured"] == pytest.approx(v["measured"], rel=1e-6)


def test_default_metric_is_mse_for_a_plain_module_and_old_plans():
    model = _classifier()
    data = _batches()
    p = sp.plan(model, sp.Budget(params=0.5), calib=data, method="svd", rounds=0)
    assert p.options["metric"] == "mse" and not any("KL" in n for n in p.notes)
    with torch.no_grad():
        ref = torch.cat([model(b) for b in data[-1:]])
    small = sp.apply(model, p, calib=data)
    with torch.no_grad():
        out = small(data[-1])
    num, den = Metric().pair(ref, out)
    assert small.sketchpass_plan.verify["measured"] == pytest.approx(num / den, rel=1e-6)
    # a plan stored before metric= existed was counted in mse, and is applied so
    old = sp.Plan.from_json(p.to_json())
    del old.options["metric"]
    assert sp.apply(model, old, calib=data).sketchpass_plan.options["metric"] == "mse"


def test_kl_changes_the_allocation_towards_what_the_softmax_sees():
    """Two branches of comparable logit energy, one of them along a direction the softmax ignores (the same
    value added to every class): under mse both matter, under kl only the other does."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = nn.Linear(16, 10)
            self.shift = nn.Linear(16, 1)

        def forward(self, x):
            return self.seen(x) + self.shift(x).expand(-1, 10)

    torch.manual_seed(0)
    model = TwoHeads().eval()
    data = [torch.randn(64, 16)]
    mse = sp.plan(model, sp.Budget(params=0.9), calib=data, method="svd", holdout=0, probes=8,
                  sensitivity_samples=64, granularity=1)
    kl = sp.plan(model, sp.Budget(params=0.9), calib=data, method="svd", holdout=0, probes=8,
                 sensitivity_samples=64, granularity=1, metric="kl")
    assert 0.1 < mse["shift"].sensitivity / mse["seen"].sensitivity < 10
    assert kl["shift"].sensitivity < 1e-6 * kl["seen"].sensitivity


# --------------------------------------------------------------------------- language models: the default
def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_a_language_model_is_measured_in_kl_by_default():
    model = _tiny_llama()
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 96, (2, 16), generator=g)} for _ in range(8)]
    small = sp.transform(model, sp.Budget(params=0.8), calib=calib, method="svd", rounds=0)
    p = small.sketchpass_plan
    assert p.options["metric"] == "kl"
    assert any("mean KL divergence of the next-token distributions" in n for n in p.notes)
    with torch.no_grad():
        num, den = KL().pair(model(**calib[-1]).logits, small(**calib[-1]).logits)
    assert p.verify["measured"] == pytest.approx(num / den, rel=1e-5)
    assert 1 / 3 < p.verify["ratio"] < 3
    mse = sp.plan(model, sp.Budget(params=0.8), calib=calib, method="svd", rounds=0, metric="mse")
    assert mse.options["metric"] == "mse" and not any("KL" in n for n in mse.notes)


def _right_padded(seed_pad: int, n=8):
    """Batches of 2 sequences of 8–16 tokens, right-padded to 16 with tokens drawn with ``seed_pad``."""
    g, gp = torch.Generator().manual_seed(0), torch.Generator().manual_seed(seed_pad)
    out = []
    for _ in range(n):
        lengths = torch.randint(8, 17, (2,), generator=g)
        mask = (torch.arange(16)[None] < lengths[:, None]).long()
        ids = torch.where(mask.bool(), torch.randint(0, 96, (2, 16), generator=g),
                          torch.randint(0, 96, (2, 16), generator=gp))
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_a_padded_language_model_counts_real_tokens_only():
    """Right-padded batches of a causal LM: what sits at the padded positions changes neither the sensitivities,
    the predicted nor the measured KL, which is the KL of the held-out batch at its real tokens."""
    model = _tiny_llama()
    a, b = _right_padded(1), _right_padded(2)
    with torch.no_grad():  # the premise: a real token's logits do not see the padding after it
        m = a[0]["attention_mask"].bool()
        torch.testing.assert_close(model(**a[0]).logits[m], model(**b[0]).logits[m])
    runs = [sp.transform(model, sp.Budget(params=0.8), calib=c, method="svd", rounds=0) for c in (a, b)]
    pa, pb = (r.sketchpass_plan for r in runs)
    for la, lb in zip(pa.layers, pb.layers):
        assert la.decision.size == lb.decision.size
        assert la.sensitivity == pytest.approx(lb.sensitivity, rel=1e-5, abs=1e-12)
        assert la.decision.predicted_error == pytest.approx(lb.decision.predicted_error, rel=1e-5, abs=1e-12)
    assert pa.verify["measured"] == pytest.approx(pb.verify["measured"], rel=1e-5)
    held = a[-1]
    with torch.no_grad():
        num, den = KL().pair(model(**held).logits, runs[0](**held).logits, held["attention_mask"].bool())
    assert den == int(held["attention_mask"].sum())
    assert pa.verify["measured"] == pytest.approx(num / den, rel=1e-5)


# --------------------------------------------------------------------------- ONNX: by perturbation
def test_onnx_kl_matches_torch():
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx_graphsurgeon")
    import sketchpass.onnx as spx

    model = _classifier()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 24),), f, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    m = onnx.load_from_string(f.getvalue())
    data = _batches()
    tp = sp.plan(model, sp.Budget(params=0.5), calib=data, method="svd", metric="kl", rounds=0, probes=16)
    op = spx.plan(m, sp.Budget(params=0.5), calib=[{"x": b.numpy()} for b in data], method="svd", metric="kl",
                  rounds=0, probes=16)
    assert op.options["metric"] == "kl" and spx.plan(m, sp.Budget(params=0.5)).options["metric"] == "mse"
    for name in ("a", "b", "head"):
        assert op[name].sensitivity == pytest.approx(tp[name].sensitivity, rel=0.5), name
    assert 1 / 3 < op.verify["ratio"] < 3
    assert op.verify["measured"] == pytest.approx(tp.verify["measured"], rel=0.05)


def test_a_language_model_with_labels_in_its_batches():
    """A batch with ``labels`` makes a Hugging Face model return its loss first: KL reads the logits after it."""
    model = _tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 96, (2, 16), generator=g) for _ in range(8)]
    small = sp.transform(model, sp.Budget(params=0.8), calib=[{"input_ids": i, "labels": i} for i in ids],
                         method="svd", rounds=0)
    p = small.sketchpass_plan
    with torch.no_grad():
        num, den = KL().pair(model(input_ids=ids[-1]).logits, small(input_ids=ids[-1]).logits)
    assert p.options["metric"] == "kl" and p.verify["measured"] == pytest.approx(num / den, rel=1e-5)
