"""sketchpass.finetune: distillation after a transform (what is trained, what is not, losses, errors)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sketchpass as sp
from sketchpass.finetune import distillation_loss, factor_parameter_names
from sketchpass.saved import PLAN_KEY

pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher(seed=0):
    torch.manual_seed(seed)
    t = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        for p in t.parameters():
            p.mul_(3.0)  # confident logits, so that the KL between teacher and student is not tiny
    return t


def _data(n_batches=16, bs=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 20, generator=g) for _ in range(n_batches)]


def _student(teacher, method="sketch", budget=0.4):
    # the last layer is kept dense, so that there is a dense weight that train="factors" must leave alone
    return sp.transform(teacher, sp.Budget(params=budget), method=method, ignore=["4"])


@torch.no_grad()
def _kd(student, teacher, batches):
    return sum(float(distillation_loss(student(x), teacher(x))) for x in batches) / len(batches)


def test_finetune_reduces_the_distillation_loss_on_held_out_inputs():
    teacher = _teacher()
    small = _student(teacher)
    held = _data(4, 64, seed=99)
    before = _kd(small, teacher, held)
    out = sp.finetune(small, teacher=teacher, data=_data(), epochs=8, lr=1e-2)
    after = _kd(out, teacher, held)
    assert before > 0.05
    assert after < 0.5 * before, (before, after)
    rec = out.sketchpass_finetune
    assert rec["steps"] == 8 * 16 and rec["epochs"] == 8 and len(rec["losses"]) == 128
    assert sum(rec["losses"][-16:]) < sum(rec["losses"][:16])


@pytest.mark.parametrize("method", ["sketch", "svd"])
def test_only_factors_and_biases_change_and_sketches_stay_fixed(method):
    teacher = _teacher()
    small = _student(teacher, method)
    kinds = {type(m).__name__ for m in small.modules()}
    assert ({"SKLinear"} if method == "sketch" else {"LowRankLinear"}) <= kinds and "Linear" in kinds
    before = {k: v.clone() for k, v in small.state_dict().items()}
    us = {n: (b.clone()) for n, b in small.named_buffers() if n.endswith(("U1", "U2"))}
    teacher_sd = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = sp.finetune(small, teacher=teacher, data=_data(4), epochs=2, lr=1e-2)
    assert out is not small
    # the input model and the teacher are untouched
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())
    assert all(torch.equal(teacher_sd[k], v) for k, v in teacher.state_dict().items())
    trained = set(factor_parameter_names(small))
    after = out.state_dict()
    assert trained == set(out.sketchpass_finetune["trained_parameters"])
    for k, v in after.items():
        if k in trained:
            assert not torch.equal(before[k], v), f"{k} should have been trained"
        else:
            assert torch.equal(before[k], v), f"{k} should not have changed"
    # a dense layer kept by the plan exists and kept its weight
    assert any(k.endswith("weight") and k not in trained for k in after)
    for n, b in out.named_buffers():
        if n in us:
            assert torch.equal(us[n], b), f"sketch {n} changed"
    if method == "sketch":
        assert us and all(not n.endswith(("U1", "U2")) for n, _ in out.named_parameters())
        assert any(k.endswith("S1") for k in trained) and any(k.endswith("S2") for k in trained)
    # requires_grad is restored: everything trainable again
    assert all(p.requires_grad for p in out.parameters())


def test_train_all_and_globs():
    teacher = _teacher()
    small = _student(teacher)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    out = sp.finetune(small, teacher=teacher, data=_data(4), steps=4, train="all", lr=1e-2)
    assert all(not torch.equal(before[k], v) for k, v in out.state_dict().items() if k != PLAN_KEY)
    out = sp.finetune(small, teacher=teacher, data=_data(4), steps=4, train=["4.*"], lr=1e-2)
    changed = {k for k, v in out.state_dict().items() if k != PLAN_KEY and not torch.equal(before[k], v)}
    assert changed == {"4.weight", "4.bias"}


def test_inplace_and_modes_restored():
    teacher = _teacher().train()
    small = _student(teacher).eval()
    out = sp.finetune(small, teacher=teacher, data=_data(2), steps=2, inplace=True)
    assert out is small and not out.training and teacher.training


def test_steps_loop_over_epochs_and_one_shot_iterators():
    teacher = _teacher()
    small = _student(teacher)
    out = sp.finetune(small, teacher=teacher, data=_data(10), steps=25)
    assert out.sketchpass_finetune["steps"] == 25 and out.sketchpass_finetune["epochs"] == 3
    loader = torch.utils.data.DataLoader(torch.randn(64, 20), batch_size=16)
    out = sp.finetune(small, teacher=teacher, data=loader, epochs=2)
    assert out.sketchpass_finetune["steps"] == 8
    with pytest.warns(RuntimeWarning, match="one-shot"):
        out = sp.finetune(small, teacher=teacher, data=iter(_data(3)), steps=5)
    assert out.sketchpass_finetune["steps"] == 3
    with pytest.raises(ValueError, match="one-shot"):
        sp.finetune(small, teacher=teacher, data=iter(_data(3)), epochs=2)
    # one epoch by default, a single tensor is one batch
    out = sp.finetune(small, teacher=teacher, data=torch.randn(8, 20))
    assert out.sketchpass_finetune["steps"] == 1


def test_label_loss_with_and_without_teacher():
    torch.manual_seed(0)
    x = torch.randn(512, 20)
    w = torch.randn(20, 10)
    y = (x @ w).argmax(1)
    batches = list(zip(x.split(32), y.split(32)))
    teacher = _teacher()
    small = _student(teacher)

    def ce(m):
        with torch.no_grad():
            return float(F.cross_entropy(m(x), y))

    # labels only: the loss is the cross-entropy on the labels, which must go down
    out = sp.finetune(small, data=batches, epochs=10, lr=1e-2, train="all")
    assert ce(out) < 0.5 * ce(small)
    assert out.sketchpass_finetune["label_weight"] == 1.0
    # distillation + labels: the label term pulls toward the labels, away from the (unrelated) teacher
    kd_only = sp.finetune(small, teacher=teacher, data=batches, labels=True, epochs=5, lr=1e-2, train="all")
    both = sp.finetune(small, teacher=teacher, data=batches, label_weight=5.0, epochs=5, lr=1e-2, train="all")
    assert ce(both) < ce(kd_only)
    # dict batches with a "labels" key
    dicts = [{"input": xb, "labels": yb} for xb, yb in batches]

    class Kw(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input):
            return self.inner(input)

    out = sp.finetune(Kw(small), teacher=Kw(teacher), data=dicts, label_weight=1.0, steps=3)
    assert out.sketchpass_finetune["steps"] == 3


def test_mse_and_callable_losses_and_tuple_outputs():
    teacher = _teacher()
    small = _student(teacher)
    held = _data(2, 64, seed=5)

    def mse(m):
        with torch.no_grad():
            return sum(float(F.mse_loss(m(x), teacher(x))) for x in held)

    out = sp.finetune(small, teacher=teacher, data=_data(), epochs=5, loss="mse", lr=3e-3)
    assert mse(out) < 0.5 * mse(small)
    calls = []

    def my_loss(s, t):
        calls.append(1)
        return (s - t).abs().mean()

    out = sp.finetune(small, teacher=teacher, data=_data(2), steps=2, loss=my_loss)
    assert len(calls) == 2 and out.sketchpass_finetune["loss"] == "my_loss"

    class Pair(nn.Module):  # outputs a tuple: the first tensor is the one distilled
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x), x.sum()

    out = sp.finetune(Pair(small), teacher=Pair(teacher), data=_data(2), steps=2)
    assert out.sketchpass_finetune["steps"] == 2


def test_batchnorm_stays_in_eval_mode_by_default():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                            nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).eval()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    small = sp.transform(teacher, sp.Budget(params=0.5), calib=calib, method="svd")
    stats = {k: v.clone() for k, v in small.state_dict().items() if "running" in k}
    assert stats
    out = sp.finetune(small, teacher=teacher, data=calib, steps=3)
    assert all(torch.equal(stats[k], out.state_dict()[k]) for k in stats)
    out = sp.finetune(small, teacher=teacher, data=calib, steps=3, bn="train")
    assert any(not torch.equal(stats[k], out.state_dict()[k]) for k in stats if "mean" in k)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(data=None), ValueError, "needs data"),
    (dict(data=5), TypeError, "data must be an iterable"),
    (dict(steps=0), ValueError, "steps must be a positive int"),
    (dict(steps=2.5), ValueError, "steps must be a positive int"),
    (dict(epochs=-1), ValueError, "epochs must be a positive int"),
    (dict(steps=2, epochs=2), ValueError, "not both"),
    (dict(lr=0), ValueError, "lr must be a positive number"),
    (dict(lr=float("nan")), ValueError, "lr must be"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(loss="ce"), ValueError, "loss must be one of"),
    (dict(optimizer="lbfgs"), ValueError, "optimizer must be one of"),
    (dict(schedule="step"), ValueError, "schedule must be one of"),
    (dict(bn="frozen"), ValueError, "bn must be one of"),
    (dict(train="some"), ValueError, "train must be one of"),
    (dict(train=["nothing.*"]), ValueError, "matches no parameter"),
    (dict(train=[3]), TypeError, "globs"),
    (dict(label_weight=-1.0), ValueError, "label_weight"),
    (dict(label_weight=1.0, labels=False), ValueError, "needs labelled batches"),
    (dict(teacher=None, labels=False), ValueError, "labels only"),
    (dict(teacher="model.onnx"), TypeError, "teacher must be"),
    (dict(data=[]), ValueError, "empty"),
    (dict(labels=True), ValueError, r"expects batches that are \(inputs, labels\)"),
    (dict(max_grad_norm=0), ValueError, "max_grad_norm"),
])
def test_argument_errors(kwargs, exc, match):
    teacher = _teacher()
    small = _student(teacher)
    args = dict(teacher=teacher, data=_data(2), steps=1)
    if "epochs" in kwargs and "steps" not in kwargs:
        args.pop("steps")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sp.finetune(small, **args)


def test_model_errors():
    teacher = _teacher()
    with pytest.raises(TypeError, match="PyTorch models only"):
        sp.finetune("small.onnx", teacher=teacher, data=_data(1))
    with pytest.raises(TypeError, match="nn.Module"):
        sp.finetune(object(), teacher=teacher, data=_data(1))
    with pytest.raises(ValueError, match="original"):
        sp.finetune(teacher, teacher=teacher, data=_data(1))
    dense = nn.Sequential(nn.Linear(20, 10, bias=False))
    with pytest.raises(ValueError, match="found nothing to train"):
        sp.finetune(dense, teacher=teacher, data=_data(1))
    with pytest.raises(ValueError, match="same shape"):
        sp.finetune(nn.Linear(20, 5), teacher=teacher, data=_data(1))
    with pytest.raises(FloatingPointError, match="lower lr"):
        sp.finetune(_student(teacher), teacher=teacher, data=[torch.full((4, 20), float("inf"))], steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.finetune(_student(teacher), teacher=teacher, data=_data(1), steps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device():
    teacher = _teacher()
    small = _student(teacher)
    out = sp.finetune(small, teacher=teacher, data=_data(2), steps=2, device="cuda")
    assert next(out.parameters()).is_cuda and not next(teacher.parameters()).is_cuda
    assert all(b.is_cuda for n, b in out.named_buffers())


@pytest.mark.assets
def test_distillation_wins_back_accuracy_on_the_mnist_cnn():
    from sketchpass.demo.data import mnist_tensors
    from sketchpass.demo.models import load_mnist_cnn

    model = load_mnist_cnn()
    x, _ = mnist_tensors("train", n=6144)
    xt, yt = mnist_tensors("test", n=2000)
    small = sp.transform(model, sp.Budget(params=0.10), calib=list(x[:1024].split(256)), method="svd")

    def acc(m):
        with torch.no_grad():
            return float((m(xt).argmax(1) == yt).float().mean())

    tuned = sp.finetune(small, teacher=model, data=list(x.split(128)), epochs=1, lr=3e-3, temperature=4.0)
    assert acc(tuned) > acc(small) + 0.01, (acc(small), acc(tuned))
