"""Models whose weights ``accelerate`` offloads (to CPU maps, to disk) or dispatches: the pass works on a
gathered copy and gives the model it gives for the same model with its weights in place; the user's model
keeps its hooks; a model with weights on the meta device and no hook to fill them is refused."""

import copy

import pytest
import torch

import sketchpass as sp

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")


def _llama(tied=True):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _calib():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 96, (2, 16), generator=g)} for _ in range(8)]


def _offload(model, how, folder):
    m = copy.deepcopy(model)
    if how == "cpu":
        accelerate.cpu_offload(m, execution_device="cpu")
    elif how == "disk":
        accelerate.disk_offload(m, str(folder), execution_device="cpu")
    else:  # a device map: some blocks in memory, some on disk
        dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
              "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        m = accelerate.dispatch_model(m, device_map=dm, offload_dir=str(folder))
    return m


@pytest.mark.parametrize("how", ["cpu", "disk", "device_map"])
def test_offloaded_model_compresses_as_the_model_in_place(how, tmp_path):
    model, calib = _llama(), _calib()
    ref = sp.transform(model, sp.Budget(params=0.8), calib=calib, method="svd", rounds=0)
    off = _offload(model, how, tmp_path / "offload")
    q = off.model.layers[1].self_attn.q_proj
    assert q.weight.device.type == "meta" and hasattr(q, "_hf_hook")
    small = sp.transform(off, sp.Budget(params=0.8), calib=calib, method="svd", rounds=0)
    p = small.sketchpass_plan
    assert any("accelerate-managed model" in n and "gathered copy" in n for n in p.notes)
    assert [lp.decision.rank for lp in p.layers] == [lp.decision.rank for lp in ref.sketchpass_plan.layers]
    assert p.verify["measured"] == pytest.approx(ref.sketchpass_plan.verify["measured"], rel=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(small(**calib[0]).logits, ref(**calib[0]).logits, rtol=1e-5, atol=1e-5)
    # the result is a plain CPU model: no hooks, no meta tensors, the tie kept
    assert not any(hasattr(m, "_hf_hook") for m in small.modules())
    assert all(t.device.type == "cpu" for t in small.parameters())
    assert small.lm_head.weight is small.model.embed_tokens.weight
    out = small.generate(input_ids=calib[0]["input_ids"][:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    # the user's model is as it was: offloaded, hooked, the same outputs
    assert q.weight.device.type == "meta" and hasattr(q, "_hf_hook")
    with torch.no_grad():
        torch.testing.assert_close(off(**calib[0]).logits, model(**calib[0]).logits)
    small.save_pretrained(tmp_path / "small")
    back = sp.load(tmp_path / "small")
    with torch.no_grad():
        torch.testing.assert_close(back(**calib[0]).logits, small(**calib[0]).logits)


def test_meta_weights_without_hooks_are_refused():
    with torch.device("meta"):
        model = _llama()
    with pytest.raises(ValueError, match=r"parameters of the model are on the meta device \(first: "
                                         r"model\.embed_tokens\.weight\): load its weights first"):
        sp.plan(model, sp.Budget(params=0.8), calib=_calib())


def test_an_offloaded_tensor_missing_from_its_weights_map_is_refused():
    model = _llama()
    off = _offload(model, "cpu", None)
    hook = off.model.layers[0].mlp.up_proj._hf_hook
    hook.weights_map = {}  # a map that lost the weight it offloaded
    with pytest.raises(ValueError, match=r"accelerate offloaded 'weight' of Linear but its weights map does not hold "
                                         r"it: the model's weights cannot be gathered"):
        sp.plan(off, sp.Budget(params=0.8), calib=_calib())
