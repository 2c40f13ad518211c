"""Mixture-of-experts decoders whose experts transformers stores fused in 3-D parameters (random small configs):
the experts are taken apart into nn.Linear layers that reproduce the fused module, factored within the budget;
the result generates, saves and reloads to the same outputs; a fused module that cannot be reproduced is kept
as it is, with the reason."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import sketchpass as sp
from sketchpass.fx.experts import RoutedExperts, is_fused, unfuse

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")  # fused experts: transformers 5

SMALL = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "num_experts_per_tok": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _configs():
    T = transformers
    return {
        "mixtral": T.MixtralConfig(intermediate_size=48, num_local_experts=4, **SMALL),
        "qwen3_moe": T.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=4, head_dim=8,
                                      **SMALL),
        "olmoe": T.OlmoeConfig(intermediate_size=24, num_experts=4, **SMALL),
        # transposed expert weights with biases, interleaved gate/up and a clamped gate of its own
        "gpt_oss": T.GptOssConfig(intermediate_size=24, num_local_experts=4, head_dim=8, **SMALL),
        "phimoe": T.PhimoeConfig(intermediate_size=48, num_local_experts=4, **SMALL),
        "granitemoe": T.GraniteMoeConfig(intermediate_size=48, num_local_experts=4, **SMALL),
        # a shared expert (a plain gated MLP) next to the routed ones
        "qwen2_moe": T.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                      shared_expert_intermediate_size=48, **SMALL),
        # multi-head latent attention, a shared expert, grouped top-k routing
        "deepseek_v3": T.DeepseekV3Config(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4, n_group=1,
                                          topk_group=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16,
                                          qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                          **{**SMALL, "num_key_value_heads": 4}),
    }


def _model(name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(_configs()[name]).eval()
    with torch.no_grad():  # some configs initialise the expert weights to zero
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _experts(model):
    return [(p, m) for p, m in model.named_modules() if is_fused(m)]


@pytest.mark.parametrize("name", sorted(_configs()))
def test_taken_apart_experts_reproduce_the_fused_module_without_copying_it(name):
    model = _model(name)
    fused = _experts(model)
    assert len(fused) == 2
    work = copy.deepcopy(model, {id(t): t for t in model.parameters()})  # shares the tensors, as the pass does
    done, notes = unfuse(work)
    assert done == [p for p, _ in fused] and "taken apart" in notes[0]
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(work, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    routed = work.get_submodule(done[0])
    assert isinstance(routed, RoutedExperts) and routed.num_experts == 4
    assert not is_fused(routed.impl) and not any(p.dim() == 3 for p in routed.parameters())
    if not fused[0][1].is_transposed:  # the experts are views of the model's own fused weight
        up = fused[0][1].gate_up_proj if fused[0][1].has_gate else fused[0][1].up_proj
        assert routed.up[1].weight.untyped_storage().data_ptr() == up.untyped_storage().data_ptr()
    assert all(is_fused(m) for _, m in _experts(model))  # the model keeps its fused modules


class _OddExperts(nn.Module):
    """Fused experts with transformers' flags whose forward is not the routed loop (it doubles every expert's
    output): taking them apart would change the model."""

    has_gate, has_bias, is_transposed = True, False, False

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(3, 8, 4))
        self.down_proj = nn.Parameter(torch.randn(3, 4, 4))
        self.act_fn = nn.SiLU()

    def _apply_gate(self, x):
        g, u = x.chunk(2, dim=-1)
        return self.act_fn(g) * u

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for j, e in enumerate(top_k_index[t].tolist()):
                h = self._apply_gate(hidden_states[t] @ self.gate_up_proj[e].T) @ self.down_proj[e].T
                out[t] += 2 * top_k_weights[t, j] * h
        return out


def test_a_fused_module_the_loop_does_not_reproduce_is_kept_with_the_reason():
    work = nn.Sequential(_OddExperts())
    done, notes = unfuse(work)
    assert done == [] and isinstance(work[0], _OddExperts) and work[0].gate_up_proj.dim() == 3
    assert len(notes) == 1
    assert "kept as they are (0; _OddExperts: a loop over its experts does not reproduce" in notes[0]
    assert "their experts are not factored" in notes[0]


def _calib():
    ids = torch.randint(3, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids[i:i + 4]} for i in range(0, 16, 4)]


# mixtral: save_pretrained writes its weights under their checkpoint names (block_sparse_moe for mlp)
@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_moe_decoder_experts_are_factored_within_the_budget_and_reload(name, tmp_path):
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = sp.transform(model, sp.Budget(params=0.6), calib=_calib(), progress=False)
    plan = small.sketchpass_plan
    assert plan.achieved()["params"] <= 0.6 + 1e-9
    assert sum(p.numel() for p in small.parameters()) <= 0.6 * sum(p.numel() for p in model.parameters())
    experts = [lp for lp in plan.layers if ".experts." in lp.spec.name]
    assert len(experts) == 2 * 2 * 4  # two layers, four experts, up and down projections
    assert sum(lp.decision.method != "dense" for lp in experts) >= len(experts) // 2, plan.report()
    assert any("taken apart into one nn.Linear per expert" in n for n in plan.notes)
    assert plan.verify["measured"] is not None and plan.verify["measured"] < 1.0
    # the input model is untouched and shares no storage with the result
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(is_fused(m) for _, m in _experts(model))
    theirs = {t.untyped_storage().data_ptr() for t in model.parameters()}
    assert not theirs & {t.untyped_storage().data_ptr() for t in small.parameters()}
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    out = small.generate(ids[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)
    small.save_pretrained(tmp_path)
    back = sp.load(tmp_path)
    assert isinstance(back, type(model))
    torch.testing.assert_close(_logits(back, ids), _logits(small, ids), atol=0, rtol=0)
    assert back.sketchpass_plan.achieved() == plan.achieved()
    torch.save(small.state_dict(), tmp_path / "small.pt")  # a state-dict file, rebuilt on the user's model
    again = sp.load(tmp_path / "small.pt", model=model)
    torch.testing.assert_close(_logits(again, ids), _logits(small, ids), atol=0, rtol=0)
    assert all(is_fused(m) for _, m in _experts(model))


def test_experts_the_first_sample_routes_nothing_to_are_refitted_in_their_block():
    """The refit's order of layers comes from one sample, which reaches only some experts: every expert of a
    taken-apart module is placed at the module, in the order the loop runs them."""
    from sketchpass.fx.frontend import TorchFrontend
    from sketchpass.options import Options

    model = _model("qwen3_moe")
    fe = TorchFrontend(model, Options())
    first = {"input_ids": torch.tensor([[5, 5]])}  # one sample of two tokens: at most 4 of the 8 (layer, expert)
    fe.prepare(first)
    order = fe._order
    for layer in (0, 1):
        prefix = f"model.layers.{layer}.mlp.experts."
        mine = [p for p in order if p.startswith(prefix)]
        assert mine == [f"{prefix}{kind}.{e}" for e in range(4) for kind in ("up", "down")]
    assert order.index("model.layers.0.mlp.experts.down.3") < order.index("model.layers.1.self_attn.q_proj")
