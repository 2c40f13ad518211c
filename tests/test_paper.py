"""bench/paper.py: the benchmark CNN's forms and its throughput changes (pool before ReLU, channels_last)
compute the same function, the configurations have the params they claim, and a tiny run writes its
report."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sketchpass as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import paper  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _relu_then_pool(model: paper.CNN, x: torch.Tensor) -> torch.Tensor:
    """The CNN as first written (ReLU, then maxpool)."""
    x = F.max_pool2d(F.relu(model.bn1(model.conv1(x))), 2)
    x = F.max_pool2d(F.relu(model.bn2(model.conv2(x))), 2)
    x = F.max_pool2d(F.relu(model.bn3(model.conv3(x))), 2)
    return model.fc2(F.relu(model.fc1(x.flatten(1))))


@pytest.mark.parametrize("config", ["dense", "sketch 8x", "low-rank 8x", "thin 8x", "sketch 8x even"])
def test_pool_before_relu_is_the_same_function(config):
    model = paper.build(config, 0).double()
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    for train in (True, False):
        model.train(train)
        torch.testing.assert_close(model(x), _relu_then_pool(model, x), rtol=0, atol=0)


@pytest.mark.parametrize("config", ["dense", "sketch 4x", "low-rank 4x"])
def test_channels_last_gives_the_same_outputs_and_gradients(config):
    # in float64, so that only the layout differs (float32 sums in another order differ by rounding)
    ref = paper.build(config, 1).double()
    cl = paper.channels_last(paper.build(config, 1).double())
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    out_ref, out_cl = ref(x), cl(paper.channels_last(x))
    torch.testing.assert_close(out_cl, out_ref, rtol=1e-9, atol=1e-10)
    F.cross_entropy(out_ref, y).backward()
    F.cross_entropy(out_cl, y).backward()
    for (n, p), q in zip(ref.named_parameters(), cl.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-10, msg=n)


@pytest.mark.parametrize("alloc", ["", " even"])
@pytest.mark.parametrize("ratio", paper.RATIOS)
def test_configurations_have_equal_params(ratio, alloc):
    dense = paper.layer_params(paper.CNN())
    sk, lr, thin = (paper.build(f"{kind} {ratio}x{alloc}", 0) for kind in ("sketch", "low-rank", "thin"))
    assert dense / paper.layer_params(sk) == pytest.approx(ratio, rel=0.05)
    # low-rank: the sketch's params layer by layer; thin: the sketch's whole-model params
    for n, (din, dout, hw) in paper.shapes().items():  # equal up to rounding the rank
        assert abs(paper.layer_params(lr, [n]) - paper.layer_params(sk, [n])) <= (din * hw + dout) / 2, n
    assert paper.n_params(thin) == pytest.approx(paper.n_params(sk), rel=0.03)


def _sizes(model):
    return {n: getattr(model, n).m if isinstance(getattr(model, n), (sp.SKConv2d, sp.SKLinear)) else None
            for n in paper.SKETCHED}


def test_equal_k_allocation_shares_one_sketch_size_and_keeps_too_small_savings_dense():
    dense = paper.CNN()
    for ratio in paper.RATIOS:
        sizes = _sizes(paper.build(f"sketch {ratio}x", 0))
        m = {v for v in sizes.values() if v is not None}
        assert len(m) == 1, sizes
        m = m.pop()
        for n, v in sizes.items():
            layer = getattr(dense, n)
            din, dout = (layer.in_channels, layer.out_channels) if n.startswith("conv") else \
                (layer.in_features, layer.out_features)
            hw = layer.weight[0, 0].numel()
            # a layer stays dense exactly when its sketch at the shared size would not be smaller
            assert (v is None) == (m * hw * (din + dout) >= din * dout * hw), (ratio, n)
    assert _sizes(paper.build("sketch 4x", 0)) == {"conv2": None, "conv3": 25, "fc1": 25}
    assert _sizes(paper.build("sketch 8x", 0)) == {"conv2": 12, "conv3": 12, "fc1": 12}


def test_even_allocation_makes_every_layer_ratio_times_smaller():
    for ratio in paper.RATIOS:
        sk, dense = paper.build(f"sketch {ratio}x even", 0), paper.CNN()
        for n in paper.SKETCHED:
            assert isinstance(getattr(sk, n), (sp.SKConv2d, sp.SKLinear))
            if n != "conv2" or ratio < 16:  # conv2 at 16x: k = 1 is the smallest there is
                assert paper.layer_params(dense, [n]) / paper.layer_params(sk, [n]) == pytest.approx(ratio, rel=0.25)
    assert _sizes(paper.build("sketch 8x even", 0)) == {"conv2": 3, "conv3": 5, "fc1": 26}
    with pytest.raises(ValueError, match="unknown allocation"):
        paper.sketch_forms(8, alloc="uniform")


def test_tiny_run_writes_the_report(tmp_path):
    try:
        paper.load("fashion", 8, 8)
        paper.load("mnist", 8, 8)
    except (FileNotFoundError, OSError, ValueError) as e:  # data sets not installed here
        pytest.skip(f"Fashion-MNIST / MNIST not available: {e}")
    argv = ["--seeds", "2", "--train-n", "256", "--mnist-train-n", "128", "--test-n", "200", "--configs",
            "dense,sketch 8x,thin 8x,sketch 8x even", "--mnist-configs", "dense", "--var-seeds", "2",
            "--l-values", "1,2", "--l-train-n", "128", "--out", str(tmp_path)]
    assert paper.main(argv) == 0
    out = json.loads((tmp_path / "paper.json").read_text())
    meta = out["meta"]
    assert (meta["train_n"], meta["mnist_train_n"], meta["l_train_n"], meta["test_n"]) == (256, 128, 128, 200)
    assert [(r["dataset"], r["config"]) for r in out["results"]] == [
        ("fashion", "dense"), ("fashion", "sketch 8x"), ("fashion", "thin 8x"), ("fashion", "sketch 8x even"),
        ("mnist", "dense")]
    assert all(len(r["accs"]) == 2 for r in out["results"])
    assert [r["l"] for r in out["l_study"]] == [1, 2]
    assert len(out["variance"]) == 15 and len(out["verdict"]) == 3
    assert "sketch 8x even" in out["verdict"][2] and "k3 k5 k26" in out["verdict"][2]
    md = (tmp_path / "paper.md").read_text()
    assert "first 256 Fashion-MNIST training images (128 for MNIST)" in md
    assert "first 128 Fashion-MNIST training images" in md  # the l study
    assert (tmp_path / "paper.png").stat().st_size > 0
