"""Training sketched networks from scratch: the variance-matched init (DESIGN §1, ``init="random"``),
``transform(..., init="random")`` on an untrained model, and SK layers used directly in model code."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sketchpass as sp

pytestmark = pytest.mark.usefixtures("one_thread")


def _dense_var(fan_in: int) -> float:
    """Variance of nn.Linear / nn.Conv's default init, U(-1/√fan_in, 1/√fan_in)."""
    return 1.0 / (3.0 * fan_in)


def _pooled_var(make, seeds=range(12)) -> float:
    """Mean over layers built with several seeds of the (uncentred) mean square of the Ŵ entries."""
    vals = []
    for s in seeds:
        with torch.no_grad():
            vals.append(float(make(s).materialize().double().pow(2).mean()))
    return sum(vals) / len(vals)


@pytest.mark.parametrize("k,l", [(4, 1), (16, 1), (4, 2), (2, 4), (8, 3)])
def test_sklinear_random_init_matches_the_dense_variance(k, l):
    d_in, d_out = 96, 40
    v = _pooled_var(lambda s: sp.SKLinear(d_in, d_out, k, l, seed=s, name="fc"))
    assert v == pytest.approx(_dense_var(d_in), rel=0.08)
    # the dense layer measured the same way, as a check of the reference
    torch.manual_seed(0)
    assert float(nn.Linear(d_in, d_out).weight.detach().pow(2).mean()) == pytest.approx(_dense_var(d_in), rel=0.08)


@pytest.mark.parametrize("k,l,groups", [(3, 1, 1), (2, 2, 1), (4, 1, 2)])
def test_skconv_random_init_matches_the_dense_variance(k, l, groups):
    cin, cout, ks = 32, 24, (3, 3)
    fan_in = cin // groups * 9
    v = _pooled_var(lambda s: sp.SKConv2d(cin, cout, ks, k, l, padding=1, groups=groups, seed=s, name="c"))
    assert v == pytest.approx(_dense_var(fan_in), rel=0.08)


def test_random_init_is_centred_and_not_scaled_by_l():
    # A wrong 1/(2l) bookkeeping would be off by a factor l or 2l: l=4 must give the same variance as l=1.
    v1 = _pooled_var(lambda s: sp.SKLinear(64, 64, 8, 1, seed=s))
    v4 = _pooled_var(lambda s: sp.SKLinear(64, 64, 2, 4, seed=s))
    assert v4 / v1 == pytest.approx(1.0, rel=0.1)
    means = [float(sp.SKLinear(64, 64, 8, 1, seed=s).materialize().mean()) for s in range(12)]
    assert abs(sum(means) / len(means)) < 0.1 * math.sqrt(_dense_var(64))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("data", ["none", "example_inputs", "calib"])
def test_transform_random_init_builds_an_untrained_sketched_architecture(data):
    torch.manual_seed(0)
    model = _cnn()
    kw = {"none": {}, "example_inputs": {"example_inputs": [torch.randn(1, 1, 8, 8)]},
          "calib": {"calib": [torch.randn(4, 1, 8, 8)]}}[data]
    small = sp.transform(model, sp.Budget(params=0.5), method="sketch", init="random", **kw)
    assert small.sketchpass_plan.options["init"] == "random"
    sk = {n: m for n, m in small.named_modules() if isinstance(m, (sp.SKLinear, sp.SKConv2d))}
    assert sk, "nothing was sketched"
    dense = dict(model.named_modules())
    lstsq = sp.transform(model, sp.Budget(params=0.5), method="sketch", init="lstsq", **kw)
    fitted = dict(lstsq.named_modules())
    for name, layer in sk.items():
        W = dense[name].weight.detach().flatten()
        W_hat = layer.materialize().detach().flatten()
        # fresh weights: uncorrelated with the dense ones (a fitted init is clearly correlated)
        corr = float(torch.corrcoef(torch.stack([W, W_hat]))[0, 1])
        fit_corr = float(torch.corrcoef(torch.stack([W, fitted[name].materialize().detach().flatten()]))[0, 1])
        assert abs(corr) < 0.2 and fit_corr > abs(corr) + 0.1, (name, corr, fit_corr)
        # and the dense init's scale
        assert float(W_hat.pow(2).mean()) == pytest.approx(_dense_var(dense[name].weight[0].numel()), rel=0.5)
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    # the input model is not modified
    assert all(type(m) is not sp.SKLinear for m in model.modules())


def test_random_init_with_calibration_sizes_layers_like_the_calibrated_plan():
    """``init="random"`` changes how the factors are built, not how the sizes are chosen: with data, the
    plan's decisions are those of the calibrated plan, and the built layers are fresh."""
    torch.manual_seed(0)
    model = _cnn()
    calib = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    kw = {"method": "sketch", "calib": calib, "ignore": ["0"], "granularity": 1}
    auto = sp.plan(model, sp.Budget(params=0.3), **kw)
    rand = sp.plan(model, sp.Budget(params=0.3), init="random", **kw)
    sizes = [(lp.spec.name, lp.decision.method, lp.decision.k) for lp in auto.layers]
    assert [(lp.spec.name, lp.decision.method, lp.decision.k) for lp in rand.layers] == sizes
    assert any(m == "sketch" for _, m, _ in sizes)
    assert [lp.decision.predicted_error for lp in rand.layers] == [lp.decision.predicted_error for lp in auto.layers]
    fresh = sp.apply(_cnn(), rand)  # a plan made on one instance applies to a fresh one, by layer name
    fitted = sp.apply(model, auto, calib=calib)
    for name, mod in fresh.named_modules():
        if isinstance(mod, (sp.SKConv2d, sp.SKLinear)):
            other = fitted.get_submodule(name)
            assert (mod.k, mod.l) == (other.k, other.l)
            assert not torch.allclose(mod.materialize(), other.materialize())


def _task(n=512, seed=0):
    """A learnable 4-class image task: which quadrant of an 8×8 image has the largest mean."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    q = torch.stack([x[:, 0, :4, :4].mean((1, 2)), x[:, 0, :4, 4:].mean((1, 2)),
                     x[:, 0, 4:, :4].mean((1, 2)), x[:, 0, 4:, 4:].mean((1, 2))], 1)
    return x, q.argmax(1)


class SketchedNet(nn.Module):
    """SK layers written directly in model code."""

    def __init__(self, seed=0):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = sp.SKConv2d(8, 16, 3, k=2, l=2, padding=1, seed=seed, name="c2")
        self.f1 = sp.SKLinear(16 * 4 * 4, 32, k=4, seed=seed, name="f1")
        self.f2 = nn.Linear(32, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)
        return self.f2(F.relu(self.f1(x.flatten(1))))


def test_sk_layers_train_directly_in_model_code():
    torch.manual_seed(0)
    net = SketchedNet()
    x, y = _task()
    xt, yt = _task(256, seed=1)
    assert set(net.state_dict()) == {"c1.weight", "c1.bias", "c2.S1", "c2.S2", "c2.bias", "f1.S1", "f1.S2",
                                     "f1.bias", "f2.weight", "f2.bias"}
    u = {n: b.clone() for n, b in net.named_buffers()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    with torch.no_grad():
        before = float(F.cross_entropy(net(xt), yt))
    for _ in range(6):
        for xb, yb in zip(x.split(32), y.split(32)):
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            assert net.c2.S1.grad is not None and float(net.c2.S1.grad.abs().sum()) > 0
            assert float(net.f1.S2.grad.abs().sum()) > 0
            opt.step()
    with torch.no_grad():
        after = float(F.cross_entropy(net(xt), yt))
        acc = float((net(xt).argmax(1) == yt).float().mean())
    assert after < 0.5 * before and acc > 0.6, (before, after, acc)
    assert all(torch.equal(u[n], b) for n, b in net.named_buffers())  # sketches are never trained


def test_finetune_without_teacher_trains_a_sketched_model_from_scratch():
    torch.manual_seed(0)
    model = _cnn()
    small = sp.transform(model, sp.Budget(params=0.5), method="sketch", init="random")
    x, y = _task()
    xt, yt = _task(256, seed=1)
    out = sp.finetune(small, data=list(zip(x.split(32), y.split(32))), epochs=6, lr=1e-2, train="all", bn="train")
    with torch.no_grad():
        acc0 = float((small(xt).argmax(1) == yt).float().mean())
        acc = float((out(xt).argmax(1) == yt).float().mean())
    assert acc > max(0.6, acc0 + 0.2), (acc0, acc)
