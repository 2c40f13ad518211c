"""Real architectures (random weights) through plan → apply → JSON replay.

torchvision resnet18, mobilenet_v3_small, efficientnet_b0, vit_b_16 and a transformers BertModel
built from a small config: outputs finite, shapes unchanged, budget met, parameter count as
reported, and the plan replays bit-exactly from its JSON.
"""

import pytest
import torch

import sketchpass as sp
from sketchpass.saved import PLAN_KEY

torchvision = pytest.importorskip("torchvision")


def _check(model, calib, example, budget=0.5, method="svd"):
    p = sp.plan(model, sp.Budget(params=budget), calib=calib, method=method)
    assert p.achieved()["params"] <= budget
    small = sp.apply(model, p, calib=calib)
    n = sum(t.numel() for t in {id(t): t for t in small.parameters()}.values())
    assert n == p.totals["params_after"]
    with torch.no_grad():
        ref = model(**example) if isinstance(example, dict) else model(example)
        out = small(**example) if isinstance(example, dict) else small(example)
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    out = out if isinstance(out, torch.Tensor) else out[0]
    assert out.shape == ref.shape and torch.isfinite(out).all()
    v = small.sketchpass_plan.verify
    rel = float((out - ref).double().square().sum() / ref.double().square().sum())
    if v["measured"] is None:  # one calibration sample: nothing to hold out, and the plan says so
        assert "nothing to hold out" in v["reason"] and "not measured" in small.sketchpass_plan.report()
    else:  # the error the plan measured on held-out data is what a fresh input of the same kind sees
        assert v["measured"] / 10 < rel < 10 * v["measured"], (rel, v)
    again = sp.apply(model, sp.Plan.from_json(p.to_json()), calib=calib)
    sd1, sd2 = small.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1 if k != PLAN_KEY)
    assert sum(lp.decision.method != "dense" for lp in p.layers) > 0
    return p


@pytest.mark.parametrize("name,res,method", [
    ("resnet18", 64, "auto"),
    ("mobilenet_v3_small", 64, "svd"),
    ("efficientnet_b0", 64, "svd"),
    ("vit_b_16", 224, "svd"),  # MultiheadAttention stays a leaf; its MLP Linears are factored
])
def test_torchvision_models(name, res, method):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    calib = [torch.randn(2 if res < 224 else 1, 3, res, res)]
    p = _check(model, calib, torch.randn(1, 3, res, res), method=method)
    if name in ("mobilenet_v3_small", "efficientnet_b0"):
        assert any("depthwise" in (lp.decision.reason or "") for lp in p.layers)


def test_transformers_bert_from_a_small_config():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (4, 16))
    calib = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    p = _check(model, calib, calib[0])
    names = {lp.spec.name for lp in p.layers}
    assert "encoder.layer.0.attention.self.query" in names and "encoder.layer.1.output.dense" in names
