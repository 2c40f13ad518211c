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


@pytest.mark.parametrize("config", ["dense", "sketch 8x", "low-rank 8x", "thin 8x"])
def test_pool_before_relu_is_the_same_function(config):
    model = paper.build(config, 0).double()
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    for train in (True, False):
        model.train(train)
        torch.testing.assert_close(model(x), _relu_then_pool(model, x), rtol=0, atol=0)


@pytest.mark.parametrize("config", ["dense", "sketch 4x", "low-rank 4x"])
def test_channels_last_gives_the_same_outputs_and_gradients(config):
    ref = paper.build(config, 1)
    cl = paper.channels_last(paper.build(config, 1))
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    out_ref, out_cl = ref(x), cl(paper.channels_last(x))
    torch.testing.assert_close(out_cl, out_ref, rtol=1e-4, atol=1e-5)
    F.cross_entropy(out_ref, y).backward()
    F.cross_entropy(out_cl, y).backward()
    for (n, p), q in zip(ref.named_parameters(), cl.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("ratio", paper.RATIOS)
def test_configurations_have_equal_params(ratio):
    dense = paper.layer_params(paper.CNN())
    sk, lr, thin = (paper.build(f"{kind} {ratio}x", 0) for kind in ("sketch", "low-rank", "thin"))
    assert all(isinstance(getattr(sk, n), (sp.SKConv2d, sp.SKLinear)) for n in paper.SKETCHED)
    assert dense / paper.layer_params(sk) == pytest.approx(ratio, rel=0.05)
    assert paper.layer_params(lr) == pytest.approx(paper.layer_params(sk), rel=0.03)
    assert paper.n_params(thin) == pytest.approx(paper.n_params(sk), rel=0.03)


def test_tiny_run_writes_the_report(tmp_path):
    try:
        paper.load("fashion", 8, 8)
        paper.load("mnist", 8, 8)
    except (FileNotFoundError, OSError, ValueError) as e:  # data sets not installed here
        pytest.skip(f"Fashion-MNIST / MNIST not available: {e}")
    argv = ["--seeds", "2", "--train-n", "256", "--mnist-train-n", "128", "--test-n", "200", "--configs",
            "dense,sketch 8x,thin 8x", "--mnist-configs", "dense", "--var-seeds", "2", "--l-values", "1,2",
            "--l-train-n", "128", "--out", str(tmp_path)]
    assert paper.main(argv) == 0
    out = json.loads((tmp_path / "paper.json").read_text())
    meta = out["meta"]
    assert (meta["train_n"], meta["mnist_train_n"], meta["l_train_n"], meta["test_n"]) == (256, 128, 128, 200)
    assert [(r["dataset"], r["config"]) for r in out["results"]] == [
        ("fashion", "dense"), ("fashion", "sketch 8x"), ("fashion", "thin 8x"), ("mnist", "dense")]
    assert all(len(r["accs"]) == 2 for r in out["results"])
    assert [r["l"] for r in out["l_study"]] == [1, 2]
    assert len(out["variance"]) == 15 and len(out["verdict"]) == 2
    md = (tmp_path / "paper.md").read_text()
    assert "first 256 Fashion-MNIST training images (128 for MNIST)" in md
    assert "first 128 Fashion-MNIST training images" in md  # the l study
    assert (tmp_path / "paper.png").stat().st_size > 0
