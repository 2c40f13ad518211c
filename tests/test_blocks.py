"""The block-chained refit of modules capture (sketchpass/fx/blocks.py): the same model as running the model up
to every layer, with block forwards that grow with the depth instead of its square; and the fallbacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sketchpass as sp


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h, scale=1.0):
        a = self.q(h) * torch.sigmoid(self.k(h))  # q and k read the same input: one refit step
        return h + scale * self.fc2(torch.relu(self.fc1(h + a)))


class Stack(nn.Module):
    """Layers before the blocks (inp), in them (keyword argument scale), and after them (out)."""

    def __init__(self, d=32, n=4, mode="chain"):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.out = nn.Linear(d, 10)
        self.mode = mode

    def forward(self, x):
        h = self.inp(x)
        if self.mode == "parallel":  # every block on the same input: not a chain
            return self.out(sum(b(h, scale=0.5) for b in self.blocks))
        for b in self.blocks:
            h = b(h, scale=0.5)
            if self.mode == "twice":
                h = b(h, scale=0.5)
        return self.out(h)


def _calib(n=6):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 5, 16, generator=g) for _ in range(n)]


def _counting(model):
    counts = {}
    for i, b in enumerate(model.blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts.get(i, 0) + 1))
    return counts


def _run(model, blocks):
    return sp.transform(model, sp.Budget(params=0.6), calib=_calib(), method="svd", capture="modules", rounds=0,
                        progress=False, blocks=blocks, overrides={"inp": 8, "out": 4})


def test_chained_refit_equals_running_the_model_up_to_every_layer():
    torch.manual_seed(0)
    model = Stack().eval()
    a, b = _run(model, "auto"), _run(model, "off")
    pa, pb = a.sketchpass_plan, b.sketchpass_plan
    assert any("chained block by block over the 4 blocks of 'blocks'" in n for n in pa.notes)
    assert any("up to every layer" in n and "block-chained refit off: blocks='off'" in n for n in pb.notes)
    assert not any("chained block by block" in n for n in pb.notes)
    assert [(lp.decision.method, lp.decision.size) for lp in pa.layers] == \
        [(lp.decision.method, lp.decision.size) for lp in pb.layers]
    assert pa["inp"].decision.method == "svd" and pa["out"].decision.method == "svd"  # before and after blocks
    assert sum(lp.decision.method == "svd" for lp in pa.layers) >= 10
    x = torch.randn(4, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)
    # the refit's steps: q and k share one (same input), so fewer steps than factored layers
    assert pa.verify["rounds"][0]["refit_steps"] < sum(lp.decision.method == "svd" for lp in pa.layers)
    assert pa.totals["measured_output_error"] == pytest.approx(pb.totals["measured_output_error"], rel=1e-3)


def test_chained_refit_runs_each_block_a_bounded_number_of_times():
    """Block forwards during the pass: chained, block 0 runs a few times per batch whatever the depth; run up to
    every layer, it runs once per later layer too."""
    torch.manual_seed(0)
    counts = {}
    for blocks in ("auto", "off"):
        model = Stack(n=8).eval()
        c = _counting(model)
        # the pass deep-copies the model: count on the copies through the hooks they inherit
        _run(model, blocks)
        counts[blocks] = c.get(0, 0)
    assert counts["auto"] * 2 < counts["off"], counts


class Pooled(Stack):
    """A pooler that runs after the blocks and whose result the forward drops (BertModel's pooler under a sentence
    encoder's own mean pooling)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.Linear(32, 32)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, scale=0.5)
        self.pool(h[:, 0])  # computed, never used
        return self.out(h)


def test_a_layer_whose_output_is_dropped_costs_no_model_run():
    """Such a layer gets sensitivity 0 (no gradient reaches it): it is fitted on its original inputs, so the refit
    does not run the whole compressed model once per batch to find its input (a layer after the last block has no
    block to stop at); every other layer is fitted exactly as without it."""
    ranks = {"inp": 8, "out": 4}
    ranks.update({f"blocks.{i}.{n}": 8 for i in range(4) for n in ("q", "k", "fc1", "fc2")})
    runs, small = {}, {}
    for pooled in (False, True):
        torch.manual_seed(0)
        model = Pooled().eval() if pooled else Stack().eval()
        calls = [0]
        model.register_forward_pre_hook(lambda m, a, c=calls: c.__setitem__(0, c[0] + 1))  # the copies inherit it
        small[pooled] = sp.transform(model, sp.Budget(params=0.95), calib=_calib(), method="svd", capture="modules",
                                     rounds=0, progress=False, overrides=dict(ranks, **({"pool": 4} if pooled else {})))
        runs[pooled] = calls[0]
    plan = small[True].sketchpass_plan
    assert plan["pool"].sensitivity == 0 and plan["pool"].decision.size == 4
    assert any("1 layer(s) whose output does not reach the model's output (sensitivity 0: pool)" in n
               for n in plan.notes)
    assert runs[True] == runs[False], runs
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(small[True](x), small[False](x))
    # apply() replays the plan the same way
    torch.manual_seed(0)
    again = sp.apply(Pooled().eval(), plan, calib=_calib(), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(again(x), small[True](x))


@pytest.mark.parametrize("mode,why", [("parallel", "does not give the next block's input"),
                                      ("twice", "not each called once, in order")])
def test_models_whose_blocks_are_not_a_chain_fall_back(mode, why):
    torch.manual_seed(0)
    model = Stack(mode=mode).eval()
    a, b = _run(model, "auto"), _run(model, "off")
    notes = a.sketchpass_plan.notes
    assert any("block-chained refit off" in n and why in n for n in notes), notes
    assert any("up to every layer" in n for n in notes)
    x = torch.randn(4, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_a_model_without_a_block_stack_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    small = sp.transform(model, sp.Budget(params=0.6), calib=_calib(), method="svd", capture="modules", rounds=0,
                         progress=False)
    assert any("block-chained refit off: no stack of repeated blocks" in n for n in small.sketchpass_plan.notes)


def test_the_chained_refit_records_no_autograd_graph():
    """Hidden states kept between refit steps carry no autograd graph (one would hold every block's activations
    of every batch alive): with no sensitivities to measure, nothing in the pass saves a tensor for backward."""
    torch.manual_seed(0)
    model = Stack().eval()
    saved = [0]

    def pack(t):
        saved[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        small = sp.transform(model, sp.Budget(params=0.6), calib=_calib(), method="svd", capture="modules", rounds=0,
                             progress=False, sensitivity_samples=0)
    assert any("chained block by block" in n for n in small.sketchpass_plan.notes)
    assert saved[0] == 0


def test_blocks_option_is_checked():
    with pytest.raises(ValueError, match="blocks must be one of"):
        sp.plan(Stack(), sp.Budget(params=0.5), calib=_calib(2), blocks="yes")
    onnx = pytest.importorskip("onnx")
    import io
    import warnings

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval(),
                          (torch.randn(2, 16),), f, dynamo=False, input_names=["x"])
    with pytest.raises(TypeError, match="option blocks= applies to PyTorch models only"):
        sp.plan(onnx.load_from_string(f.getvalue()), sp.Budget(params=0.5), blocks="off")


def _two_ways(make, batches, a: dict, b: dict):
    """A small decoder (``make()`` after seeding) transformed at params 0.85 with options ``a`` and with options
    ``b``, on the same random token batches: ``(calib, first result, second result)``."""
    torch.manual_seed(0)
    model = make().eval()
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(3, 128, (2, 16), generator=g)} for _ in range(batches)]
    kw = {"calib": calib, "method": "svd", "rounds": 0, "progress": False}
    return calib, sp.transform(model, sp.Budget(params=0.85), **a, **kw), sp.transform(model, sp.Budget(params=0.85),
                                                                                        **b, **kw)


def test_hf_decoder_chained_refit_matches(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=64, vocab_size=128, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2)
    calib, a, b = _two_ways(lambda: transformers.GPT2LMHeadModel(cfg), 4, {"blocks": "auto"}, {"blocks": "off"})
    assert any("chained block by block over the 3 blocks of 'transformer.h'" in n for n in a.sketchpass_plan.notes)
    ids = calib[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- block-by-block calibration
def _plan_sizes(plan):
    return [(lp.spec.name, lp.decision.method, lp.decision.size) for lp in plan.layers]


def _gram_mb(model, paths):
    """What sketchpass.pipeline.gram_bytes counts for these Linear layers, in MB."""
    mods = [model.get_submodule(p) for p in paths]
    return sum((m.in_features ** 2 + 2 * m.in_features + 1) * 8 for m in mods) / 2**20


@pytest.mark.parametrize("method", ["svd", "auto"])
def test_block_mode_gives_the_whole_model_plan_with_one_blocks_grams(method):
    """blocks='on' (one block's Grams at a time) and whole-model calibration: the same plan, the same model, and
    the Gram memory is the largest group's (the outside layers, or one block) instead of every layer's."""
    model = Stack(n=4).eval()
    kw = {"calib": _calib(), "method": method, "capture": "modules", "rounds": 0, "progress": False,
          "overrides": {"inp": 8, "out": 4}}
    whole = sp.transform(model, sp.Budget(params=0.6), **kw)
    blocks = sp.transform(model, sp.Budget(params=0.6), blocks="on", **kw)
    pw, pb = whole.sketchpass_plan, blocks.sketchpass_plan
    assert pw.calib["mode"] == "model" and pb.calib["mode"] == "blocks"
    assert _plan_sizes(pw) == _plan_sizes(pb)
    for a, b in zip(pw.layers, pb.layers):
        assert b.decision.predicted_error == pytest.approx(a.decision.predicted_error, rel=1e-6, abs=1e-12)
    x = _calib()[0]
    with torch.no_grad():
        torch.testing.assert_close(blocks(x), whole(x), rtol=1e-4, atol=1e-5)
    one_block = _gram_mb(model, ["blocks.0.q", "blocks.0.k", "blocks.0.fc1", "blocks.0.fc2"])
    every = 4 * one_block + _gram_mb(model, ["inp", "out"])  # layers with an override still get their Grams
    assert pw.calib["peak_gram_mb"] == pytest.approx(every, abs=1e-3)
    assert pb.calib["peak_gram_mb"] == pytest.approx(max(one_block, _gram_mb(model, ["inp", "out"])), abs=1e-3)
    assert any("calibrated block by block (4 blocks)" in n for n in pb.notes)


def test_block_mode_is_chosen_when_the_grams_exceed_max_grams_mb():
    model = Stack(n=4).eval()
    kw = {"calib": _calib(), "method": "svd", "capture": "modules", "rounds": 0, "progress": False}
    assert sp.plan(model, sp.Budget(params=0.6), **kw).calib["mode"] == "model"
    assert sp.plan(model, sp.Budget(params=0.6), max_grams_mb=0.05, **kw).calib["mode"] == "blocks"


def test_block_mode_spills_activations_to_disk_with_the_same_result():
    model = Stack(n=4).eval()
    kw = {"calib": _calib(), "method": "svd", "capture": "modules", "rounds": 0, "progress": False, "blocks": "on"}
    mem = sp.transform(model, sp.Budget(params=0.6), **kw)
    disk = sp.transform(model, sp.Budget(params=0.6), max_activation_mb=1e-4, **kw)
    assert disk.sketchpass_plan.verify["rounds"][0]["store_spilled"] > 0
    assert _plan_sizes(mem.sketchpass_plan) == _plan_sizes(disk.sketchpass_plan)
    x = _calib()[0]
    with torch.no_grad():
        torch.testing.assert_close(disk(x), mem(x))


@pytest.mark.parametrize("mode, why", [("parallel", "does not give the next block's input"),
                                       ("flat", "no stack of repeated blocks")])
def test_block_mode_without_a_chain_falls_back_to_the_whole_model_with_a_note(mode, why):
    model = Stack(n=4, mode=mode if mode != "flat" else "chain").eval()
    if mode == "flat":
        model.blocks = nn.Sequential(*model.blocks)  # not a ModuleList: no stack found
    plan = sp.plan(model, sp.Budget(params=0.6), calib=_calib(), method="svd", capture="modules", rounds=0,
                   progress=False, blocks="on")
    assert plan.calib["mode"] == "model"
    note = next(n for n in plan.notes if n.startswith("blocks='on', but block-by-block calibration is not available"))
    assert why in note and "the whole model is calibrated at once" in note


def test_block_mode_on_a_decoder_matches_whole_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64, vocab_size=128, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    calib, a, b = _two_ways(lambda: transformers.LlamaForCausalLM(cfg), 5, {"blocks": "on"}, {})
    assert a.sketchpass_plan.calib["mode"] == "blocks"
    assert _plan_sizes(a.sketchpass_plan) == _plan_sizes(b.sketchpass_plan)
    assert a.sketchpass_plan.calib["peak_gram_mb"] < b.sketchpass_plan.calib["peak_gram_mb"] / 2
    ids = calib[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=1e-3, atol=1e-4)


def test_an_interrupted_block_mode_run_leaves_nothing_behind(tmp_path, monkeypatch):
    """Interrupted in the middle of block-by-block calibration with its activations on disk: no model, and the
    temporary folder of spilled activations is gone."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = Stack(n=4).eval()
    calls = [0]

    def interrupt(mod, args):
        calls[0] += 1
        if calls[0] == len(_calib()) + 3:  # past the whole-model forwards, inside the per-block runs
            assert list(tmp_path.glob("sketchpass-store-*/*")), "the activations were meant to be on disk"
            raise KeyboardInterrupt

    model.blocks[2].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        sp.transform(model, sp.Budget(params=0.6), calib=_calib(), method="svd", capture="modules", rounds=0,
                     progress=False, blocks="on", max_activation_mb=1e-4)
    assert calls[0] == len(_calib()) + 3
    assert not list(tmp_path.iterdir())


_PEAK = r"""
import resource, sys, torch
sys.path.insert(0, {here!r})
from test_blocks import Stack, _calib
import sketchpass as sp
torch.set_num_threads(1)
torch.manual_seed(0)
model = Stack(d=1024, n=8).eval()
plan = sp.plan(model, sp.Budget(params=0.6), calib=_calib(3), method="svd", capture="modules", holdout=0,
               progress=False, blocks={blocks!r}, sensitivity_samples=4)
print(plan.calib["mode"], plan.calib["peak_gram_mb"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_block_mode_lowers_the_measured_peak_memory():
    """8 blocks whose Grams (56 MB each) dominate the pass's memory: calibrated whole the process peaks with all
    of them (457 MB with the output layer's), block by block with one; measured as each process's peak resident
    memory."""
    import subprocess
    import sys
    from pathlib import Path

    got = {}
    for blocks in ("auto", "on"):
        code = _PEAK.format(here=str(Path(__file__).parent), blocks=blocks)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        mode, gram_mb, rss_mb = out.stdout.split()
        got[blocks] = (mode, float(gram_mb), int(rss_mb))
    assert got["auto"][0] == "model" and got["on"][0] == "blocks"
    block = (3 * 1025**2 + 2049**2) * 8 / 2**20
    assert got["auto"][1] == pytest.approx(8 * block + 1025**2 * 8 / 2**20 + 17**2 * 8 / 2**20, abs=0.01)
    assert got["on"][1] == pytest.approx(block, abs=0.01)
    assert got["on"][2] < got["auto"][2] - 250, got  # most of the 400 MB of Grams not held shows in the peak
