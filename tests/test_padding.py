"""Padded batches (an ``attention_mask`` of zeros and ones): the calibration and the refit count the rows of the
real tokens only, so what sits at padded positions changes nothing in the plan; the refit reuses the
calibration's forward of every batch instead of running the model again."""

import pytest
import torch
from torch import nn

import sketchpass as sp
import sketchpass.fx.frontend as ff
from sketchpass.batches import fingerprint, token_mask
from sketchpass.fx.observe import layer_input
from sketchpass.site import Site

transformers = pytest.importorskip("transformers")


# --------------------------------------------------------------------------- pure
def test_token_mask():
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(token_mask({"input_ids": m, "attention_mask": m}), m.bool())
    assert token_mask({"attention_mask": torch.ones(2, 3, dtype=torch.long)}) is None  # nothing padded
    assert token_mask({"attention_mask": torch.tensor([[0.0, -1e9]])}) is None  # an additive mask: not 0/1
    assert token_mask({"attention_mask": torch.ones(2, 1, 3, 3)}) is None  # not (samples, tokens)
    assert token_mask((m, m)) is None and token_mask(m) is None


def test_layer_input_keeps_real_rows_and_counts_every_position():
    lin = nn.Linear(4, 2)
    site = Site.__new__(Site)
    site.spec = type("S", (), {"op": "linear", "d_in": 4})()
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    inp = layer_input(site, lin, x, None, mask)
    assert torch.equal(inp.x, torch.stack([x[0, 0], x[0, 1], x[1, 0]]))
    assert inp.p_in == inp.p_out == 6 and inp.samples == 2
    other = layer_input(site, lin, x[:, :2], None, mask)  # another sequence length: every row
    assert other.x.shape == (4, 4)


def test_fingerprint():
    a = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    b = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    assert fingerprint(a) == fingerprint(b)
    b["input_ids"][0, 2] = 4
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(torch.zeros(2, 3)) != fingerprint(torch.zeros(3, 2))


# --------------------------------------------------------------------------- a BERT sentence encoder
class Encoder(nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)


def _encoder():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return Encoder(transformers.BertModel(cfg).eval()).eval()


def _padded(seed_pad: int):
    """8 batches of 4 sentences of 6–16 tokens, padded to 16 with tokens drawn with ``seed_pad``."""
    g, gp = torch.Generator().manual_seed(0), torch.Generator().manual_seed(seed_pad)
    out = []
    for _ in range(8):
        lengths = torch.randint(6, 17, (4,), generator=g)
        ids = torch.randint(1, 100, (4, 16), generator=g)
        mask = (torch.arange(16)[None] < lengths[:, None]).long()
        ids = torch.where(mask.bool(), ids, torch.randint(1, 100, (4, 16), generator=gp))
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _plan(model, calib):
    small = sp.transform(model, sp.Budget(params=0.7), calib=calib, method="svd", rounds=0, granularity=2)
    p = small.sketchpass_plan
    return small, [(lp.decision.rank, lp.decision.predicted_error, lp.sensitivity) for lp in p.layers], p


def test_what_sits_at_padded_positions_changes_nothing():
    model = _encoder()
    a, b = _padded(1), _padded(2)
    with torch.no_grad():  # the premise: the encoder's outputs do not see the padded tokens
        torch.testing.assert_close(model(**a[0]), model(**b[0]))
    small_a, plan_a, pa = _plan(model, a)
    small_b, plan_b, _ = _plan(model, b)
    assert [r for r, _, _ in plan_a] == [r for r, _, _ in plan_b]
    for (_, ea, sa), (_, eb, sb) in zip(plan_a, plan_b):
        assert ea == pytest.approx(eb, rel=1e-5, abs=1e-9) and sa == pytest.approx(sb, rel=1e-5, abs=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(small_a(**a[0]), small_b(**b[0]), rtol=1e-4, atol=1e-5)
    assert pa.verify["measured"] > 0


def test_without_the_mask_padding_would_change_the_plan(monkeypatch):
    """The control of the test above: counting every row, the padded tokens enter the Grams."""
    monkeypatch.setattr(ff, "token_mask", lambda batch: None)
    model = _encoder()
    _, plan_a, _ = _plan(model, _padded(1))
    _, plan_b, _ = _plan(model, _padded(2))
    assert any(ea != pytest.approx(eb, rel=1e-3) for (_, ea, _), (_, eb, _) in zip(plan_a, plan_b))


def test_the_refit_reuses_the_calibration_forwards(monkeypatch):
    model = _encoder()
    calib = _padded(1)
    calls = [0]
    model.bert.embeddings.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))

    def run():
        calls[0] = 0
        small = sp.transform(model, sp.Budget(params=0.7), calib=calib, method="svd", rounds=0, granularity=2)
        return calls[0], small

    reused, small = run()
    monkeypatch.setattr(ff.TorchFrontend, "close", lambda self: None)
    real_record = ff.TorchFrontend._record

    def forget(self, batch):  # records nothing: the refit's start runs the model again
        rec = real_record(self, batch)
        self._records.close()
        return rec

    monkeypatch.setattr(ff.TorchFrontend, "_record", forget)
    again, small2 = run()
    fit_batches = small.sketchpass_plan.calib["batches"]
    assert fit_batches == 7 and again - reused == fit_batches
    with torch.no_grad():
        torch.testing.assert_close(small(**calib[0]), small2(**calib[0]))
