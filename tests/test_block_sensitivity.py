"""Sensitivities measured one block's backward at a time (sketchpass/fx/blocks.py, ``sensitivity_by_block``): the
same gains as one backward through the whole model, the fallbacks when the blocks cannot be run apart for it, and
the memory it saves."""

from __future__ import annotations

import pytest
import torch
from test_blocks import Stack, _calib
from torch import nn

import sketchpass as sp
from sketchpass.fx import observe as fo
from sketchpass.fx.blocks import NotChained, sensitivity_by_block
from sketchpass.fx.frontend import TorchFrontend
from sketchpass.options import Options


class SideRead(Stack):
    """The output also reads the hidden state after the second block (a layer-aggregation head)."""

    def __init__(self):
        super().__init__()
        self.side = nn.Linear(32, 10)

    def forward(self, x):
        h = self.inp(x)
        mid = None
        for i, b in enumerate(self.blocks):
            h = b(h, scale=0.5)
            if i == 1:
                mid = h
        return self.out(h) + self.side(mid)


class GatedKwarg(Stack):
    """Every block is called with a keyword tensor a matched layer computes (like an encoder's output handed to
    a decoder's blocks)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 1)

    def forward(self, x):
        h, s = self.inp(x), torch.sigmoid(self.gate(x))
        for b in self.blocks:
            h = b(h, scale=s)
        return self.out(h)


def _frontend(model, batch):
    o = Options(capture="modules")
    fe = TorchFrontend(model, o)
    fe.calib([batch], o)
    fe.prepare(batch)
    sites = [s for s in fe.sites() if s.skip is None]
    assert fe._chain is not None
    return fe, sites


def _both(fe, sites, batches, probes=2):
    kw = dict(probes=probes, seed=3, module_of=lambda st: st.dense, metric=fe.metric, mask_of=fe._mask)
    return fo.sensitivity(fe.cap.model, sites, batches, **kw), sensitivity_by_block(fe.cap.model, fe._chain, sites,
                                                                                    batches, **kw)


def test_block_by_block_gains_equal_the_whole_model_backward():
    """Layers before the blocks (inp), in them, and after them (out); two probes; two batches."""
    torch.manual_seed(0)
    batches = _calib(2)
    fe, sites = _frontend(Stack().eval(), batches[0])
    whole, blocks = _both(fe, sites, batches)
    assert set(whole) == set(blocks) == {s.name for s in sites}
    assert all(v > 0 for v in whole.values())
    for k in whole:
        assert blocks[k] == pytest.approx(whole[k], rel=1e-5), k


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_block_by_block_gains_equal_on_hf_decoders_with_padding(arch):
    """KL probes at the real tokens only (the second sample half padding); GPT-2's blocks return tuples and its
    projections are Conv1D; Llama's ``lm_head`` (untied) is a layer after the last block."""
    transformers = pytest.importorskip("transformers")
    if arch == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                       tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=128, bos_token_id=1, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(cfg)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    fe, sites = _frontend(model.eval(), batch)
    assert fe.metric.name == "kl"
    whole, blocks = _both(fe, sites, [batch])
    assert any("lm_head" in k or "c_attn" in k for k in whole)
    for k in whole:
        assert blocks[k] == pytest.approx(whole[k], rel=1e-5), k


@pytest.mark.parametrize("model,why", [
    (SideRead, "the model's output reads the hidden state of a block other than the last"),
    (GatedKwarg, "is called with a tensor that depends on a matched layer besides its hidden state")])
def test_blocks_that_cannot_be_run_apart_raise(model, why):
    torch.manual_seed(0)
    batches = _calib(1)
    fe, sites = _frontend(model().eval(), batches[0])
    with pytest.raises(NotChained, match=why):
        _both(fe, sites, batches)


@pytest.mark.parametrize("make,how", [
    (Stack, "sensitivities measured block by block: one backward through each of the 4 blocks at a time"),
    (SideRead, "sensitivities measured with one backward through the whole model (not block by block: the "
               "model's output reads the hidden state of a block other than the last)"),
    (GatedKwarg, "sensitivities measured with one backward through the whole model (not block by block: block "
                 "'blocks.0' is called with a tensor that depends on a matched layer")])
def test_the_plan_says_how_sensitivities_were_measured_and_they_match(make, how):
    """Through sp.plan: the plan's sensitivities are those of one whole-model backward (blocks='off' measures that
    way), whichever way they were measured."""
    got = {}
    for blocks in ("auto", "off"):
        torch.manual_seed(0)
        got[blocks] = sp.plan(make().eval(), sp.Budget(params=0.6), calib=_calib(), method="svd", capture="modules",
                              progress=False, blocks=blocks)
    notes = got["auto"].notes
    assert any(n.startswith(how) for n in notes), notes
    assert not any(n.startswith("sensitivities measured") for n in got["off"].notes)
    assert len(got["off"].layers) == len(got["auto"].layers) > 10
    for lp in got["off"].layers:
        assert got["auto"][lp.spec.name].sensitivity == pytest.approx(lp.sensitivity, rel=1e-5), lp.spec.name


_PEAK = r"""
import resource, sys, torch
sys.path.insert(0, {here!r})
from test_block_sensitivity import _frontend, _both
from test_blocks import Stack
from sketchpass.fx import observe as fo
from sketchpass.fx.blocks import sensitivity_by_block
torch.set_num_threads(1)
torch.manual_seed(0)
batch = torch.randn(16, 256, 16)
fe, sites = _frontend(Stack(d=256, n=8).eval(), batch[:2])
kw = dict(probes=1, seed=0, module_of=lambda st: st.dense, metric=fe.metric, mask_of=fe._mask)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
if {by_block!r}:
    gains = sensitivity_by_block(fe.cap.model, fe._chain, sites, [batch], **kw)
else:
    gains = fo.sensitivity(fe.cap.model, sites, [batch], **kw)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, sum(gains.values()))
"""


def test_block_by_block_sensitivities_lower_the_measured_peak_memory():
    """8 blocks on 4096 tokens: the whole-model backward holds every block's activations (about 40 MB each), the
    block-wise one one block's; measured as each process's peak resident memory during the measurement."""
    import subprocess
    import sys
    from pathlib import Path

    got = {}
    for by_block in (False, True):
        code = _PEAK.format(here=str(Path(__file__).parent), by_block=by_block)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        before, peak, total = out.stdout.split()
        got[by_block] = (int(peak) - int(before), float(total))
    print("sensitivity peak growth MB (whole-model backward, block by block):", got[False][0], got[True][0])
    assert got[True][1] == pytest.approx(got[False][1], rel=1e-5)
    assert got[True][0] < got[False][0] - 150, got


class Carry(nn.Module):
    """Each block hands a second tensor (a running sum of its updates) to the next one besides its hidden state."""

    def __init__(self, d=32, n=3):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.blocks = nn.ModuleList(CarryBlock(d) for _ in range(n))
        self.out = nn.Linear(d, 10)

    def forward(self, x):
        h = self.inp(x)
        r = torch.zeros_like(h)
        for b in self.blocks:
            h, r = b(h, r)
        return self.out(h + r)


class CarryBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, h, r):
        u = torch.tanh(self.fc(h))
        return h + u, r + u


def test_a_second_stream_between_blocks_is_not_cut():
    torch.manual_seed(0)
    batches = _calib(1)
    fe, sites = _frontend(Carry().eval(), batches[0])
    with pytest.raises(NotChained, match="is called with a tensor that depends on a matched layer"):
        _both(fe, sites, batches)


@pytest.mark.parametrize("flag", ["output_attentions", "output_hidden_states"])
def test_outputs_read_from_inside_the_blocks_are_not_cut(flag):
    """A Hugging Face encoder returning its attention weights or every block's hidden states (recorded by its own
    hooks), measured under the squared error of all its outputs: those outputs depend on the blocks' layers other
    than through the last hidden state, so the block-wise backward declines, and the whole-model one is used."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, intermediate_size=64, num_attention_heads=4,
                                  vocab_size=100, attn_implementation="eager", **{flag: True})
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(3, 100, (2, 12), generator=g)}
    fe, sites = _frontend(transformers.BertModel(cfg).eval(), batch)
    assert fe.metric.name == "mse"
    with pytest.raises(NotChained, match="through something else than the hidden state"):
        _both(fe, sites, [batch])
