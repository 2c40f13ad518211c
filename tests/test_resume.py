"""Paused block runs in the block-chained refit (sketchpass/fx/resume.py): the same model bit for bit as running
each block from its start for every refit step, with fewer block forwards; never passing a layer not yet fitted;
the grad mode of the caller kept; the gates gone from the result."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from test_blocks import Stack, _calib
from torch import nn

import sketchpass as sp
from sketchpass.fx import frontend, resume
from sketchpass.fx.blocks import Call
from sketchpass.saved import PLAN_KEY


def _hf(name):
    transformers = pytest.importorskip("transformers")
    from test_hf import _configs

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "bert":
            cfg = transformers.BertConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                          num_attention_heads=4, vocab_size=128, max_position_embeddings=64)
            return transformers.BertModel(cfg, add_pooling_layer=False).eval()
        return transformers.AutoModelForCausalLM.from_config(_configs()[name]).eval()


def _token_calib(n=8, t=16, pad=False):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (n, t), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[1::2, t // 2:] = 0
    return [{"input_ids": ids[i:i + 2], "attention_mask": mask[i:i + 2]} for i in range(0, n, 2)]


def _case(name):
    if name == "stack":
        torch.manual_seed(0)
        return Stack(n=4).eval(), _calib(), {"overrides": {"inp": 8, "out": 4}}
    return _hf(name), _token_calib(pad=name in ("llama", "bert")), {}


class _Counts:
    def __init__(self, monkeypatch):
        self.runs = self.reruns = 0
        make, rerun = resume.BlockRun.__init__, frontend.input_in_block

        def counted_make(run, *a, **k):
            self.runs += 1
            make(run, *a, **k)

        def counted_rerun(*a, **k):
            self.reruns += 1
            return rerun(*a, **k)

        monkeypatch.setattr(resume.BlockRun, "__init__", counted_make)
        monkeypatch.setattr(frontend, "input_in_block", counted_rerun)


def _transform(model, calib, extra, **kw):
    return sp.transform(model, sp.Budget(params=0.6), calib=calib, method="svd", capture="modules", rounds=0,
                        progress=False, **extra, **kw)


def _same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if k != PLAN_KEY:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", ["stack", "llama", "gpt2", "phi3", "opt", "bert"])
def test_paused_runs_give_the_model_of_runs_from_the_block_start_bit_for_bit(name, monkeypatch):
    model, calib, extra = _case(name)
    counts = _Counts(monkeypatch)
    paused = _transform(model, calib, extra)
    runs, reruns = counts.runs, counts.reruns
    assert any("chained block by block" in n for n in paused.sketchpass_plan.notes)
    monkeypatch.setattr(resume, "ENABLED", False)
    fresh = _transform(model, calib, extra)
    assert runs > 0 and reruns == 0, (runs, reruns)  # every compressed input came from a paused run
    assert counts.reruns > 0  # and without them, from runs from the block's start
    _same_weights(paused, fresh)
    assert paused.sketchpass_plan.totals["measured_output_error"] == fresh.sketchpass_plan.totals[
        "measured_output_error"]
    # no gate is left on the result: it pickles, and no module has a forward of its own
    assert not any("forward" in m.__dict__ for m in paused.modules())
    torch.save(paused, io.BytesIO())


def test_paused_runs_cost_fewer_block_forwards(monkeypatch):
    """Block 0's forwards during the pass (counted through the hooks the pass's copies inherit)."""
    counts = {}
    for enabled in (True, False):
        monkeypatch.setattr(resume, "ENABLED", enabled)
        torch.manual_seed(0)
        model = Stack(n=4).eval()
        seen = [0]
        model.blocks[0].register_forward_pre_hook(lambda m, a, seen=seen: seen.__setitem__(0, seen[0] + 1))
        _transform(model, _calib(), {"overrides": {"inp": 8, "out": 4}})
        counts[enabled] = seen[0]
    assert counts[True] < counts[False], counts


def test_runs_beyond_max_activation_mb_are_not_kept(monkeypatch):
    model, calib, extra = _case("stack")
    counts = _Counts(monkeypatch)
    small = _transform(model, calib, extra, max_activation_mb=1e-4)  # the store spills to disk too
    assert counts.runs == 0 and counts.reruns > 0
    monkeypatch.setattr(resume, "ENABLED", False)
    _same_weights(small, _transform(model, calib, extra))


# --------------------------------------------------------------------------- BlockRun itself
class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, h, scale=1.0):
        return self.c(torch.relu(self.b(torch.relu(self.a(h))))) * scale


def _gated(block: Chain):
    gates = resume.Gates(block.get_submodule)
    for p in ("a", "b", "c"):
        gates.add(p, block.get_submodule(p))
    return gates


def test_a_run_pauses_at_each_layer_and_never_passes_one_not_fitted():
    torch.manual_seed(0)
    block, fitted = Chain(), Chain()
    h = torch.randn(3, 4)
    call = Call((), {"scale": 2.0}, True)
    gates = _gated(block)
    run = resume.BlockRun(block, call, h, {"a", "b", "c"})
    done: set[str] = set()
    assert run.input_of("a", done.__contains__) is h  # paused at a, before it runs
    assert run.input_of("b", done.__contains__) is resume.MISS  # a is not fitted: the run stays at a
    assert run.output(done.__contains__) is resume.MISS
    block.a = fitted.a
    done.add("a")
    with torch.no_grad():
        want_b = torch.relu(fitted.a(h))
        torch.testing.assert_close(run.input_of("b", done.__contains__), want_b, rtol=0, atol=0)
        assert run.input_of("a", done.__contains__) is resume.MISS  # passed already
        block.b, block.c = fitted.b, fitted.c
        done |= {"b", "c"}
        torch.testing.assert_close(run.output(done.__contains__), fitted(h, scale=2.0), rtol=0, atol=0)
    assert run.done
    gates.remove()
    assert not any("forward" in m.__dict__ for m in (block, fitted, *block.children()))


def test_a_gate_outside_a_run_calls_the_layer_as_it_stands():
    torch.manual_seed(0)
    block = Chain()
    dense = Chain()
    dense.load_state_dict(block.state_dict())
    h = torch.randn(3, 4)
    gates = _gated(block)
    torch.testing.assert_close(block(h), dense(h), rtol=0, atol=0)
    gates.remove()


def test_the_callers_grad_mode_is_kept_across_switches():
    torch.manual_seed(0)
    block = Chain()
    gates = _gated(block)
    h = torch.randn(3, 4)
    with torch.enable_grad():
        run = resume.BlockRun(block, Call((), {}, True), h, {"b"})
        x = run.input_of("b", lambda p: False)
        assert torch.is_grad_enabled()
        assert not x.requires_grad  # the run itself runs without autograd
        run.close()
        assert torch.is_grad_enabled() and run.done
    with torch.no_grad():
        run = resume.BlockRun(block, Call((), {}, True), h, {"b"})
        run.input_of("b", lambda p: False)
        run.close()
        assert not torch.is_grad_enabled()
    gates.remove()


def test_an_error_in_a_run_reaches_the_caller():
    class Bad(Chain):
        def forward(self, h, scale=1.0):
            x = self.b(self.a(h))
            raise RuntimeError(f"bad block at {tuple(x.shape)}")

    torch.manual_seed(0)
    block = Bad()
    gates = _gated(block)
    run = resume.BlockRun(block, Call((), {}, True), torch.randn(3, 4), {"b"})
    with pytest.raises(RuntimeError, match=r"bad block at \(3, 4\)"):
        run.output(lambda p: True)
    assert run.done and resume.BlockRun.active() is None
    gates.remove()


def test_a_gate_reached_from_another_thread_while_a_run_executes_calls_the_layer():
    """The run executing now is the current greenlet's, per thread: another thread's pass (or any code) reaching a
    gate while a run executes in this one is not taken for that run."""
    import threading

    torch.manual_seed(0)
    got = {}

    class Spawning(Chain):
        def forward(self, h, scale=1.0):
            x = torch.relu(self.a(h))
            t = threading.Thread(target=lambda: got.__setitem__("b", self.b(x)))  # b's gate, from another thread
            t.start()
            t.join()
            return self.c(torch.relu(self.b(x)))

    block = Spawning()
    gates = _gated(block)
    h = torch.randn(3, 4)
    run = resume.BlockRun(block, Call((), {}, True), h, {"b"})
    x = run.input_of("b", lambda p: False)
    with torch.no_grad():
        torch.testing.assert_close(got["b"].detach(), torch.nn.functional.linear(x, block.b.weight, block.b.bias),
                                   rtol=0, atol=0)
        torch.testing.assert_close(run.output(lambda p: True), block.c(torch.relu(block.b(x))), rtol=0, atol=0)
    gates.remove()
