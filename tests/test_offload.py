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


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t.device.type != "meta"}


def _offload(model, how, folder, tensors: list | None = None):
    """``model`` offloaded ``how``; ``tensors`` receives its tensors from before (a CPU weights map and the modules
    kept in memory hold these; the list keeps them alive, so that no storage address is reused)."""
    m = copy.deepcopy(model)
    if tensors is not None:
        tensors += list(m.state_dict().values())
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
    users = []
    off = _offload(model, how, tmp_path / "offload", users)
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
    # nor does it share a tensor with the user's model (its weights maps, its modules in memory): training the
    # result must not change the model it came from
    assert users and not _storages(users) & _storages([*small.parameters(), *small.buffers()])
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


_BIG = r"""
import sys, torch
from torch import nn
sys.path.insert(0, {here!r})
from test_blocks import Block


class Big(nn.Module):  # 100 M parameters (400 MB), nearly all of them in an embedding the pass leaves alone
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(200_000, 500)
        self.proj = nn.Linear(500, 32)
        self.blocks = nn.ModuleList(Block(32) for _ in range(4))
        self.out = nn.Linear(32, 10)

    def forward(self, ids):
        h = self.proj(self.emb(ids))
        for b in self.blocks:
            h = b(h)
        return self.out(h)
"""

_PEAK = _BIG + r"""
import threading, time, accelerate
import sketchpass as sp
torch.set_num_threads(1)


def anon_mb():  # resident anonymous memory: what the process allocated (not the page cache of files it maps)
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024


peak, done = [0], threading.Event()


def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_mb())
        time.sleep(0.002)


threading.Thread(target=sample, daemon=True).start()
if {folder!r}:  # the offload folder written before: the weights are read from it, never all in memory at once
    with accelerate.init_empty_weights():
        model = Big().eval()
    accelerate.disk_offload(model, {folder!r}, execution_device="cpu")
else:
    torch.manual_seed(0)
    model = Big().eval()
built = anon_mb()
g = torch.Generator().manual_seed(0)
calib = [torch.randint(0, 200_000, (8, 5), generator=g) for _ in range(3)]
plan = sp.plan(model, sp.Budget(params=0.99995), calib=calib, method="svd", holdout=0, progress=False, blocks="on",
               capture="modules")
assert plan.calib["mode"] == "blocks"
done.set()
print(built, max(peak[0], anon_mb()))
"""


def test_a_model_is_held_once_in_memory_or_disk_offloaded(tmp_path):
    """The pass holds a model's weights once: in memory, its working copy shares the user's tensors (the pass
    adds far less than the 400 MB a second copy would); disk-offloaded, the gathered copy (which its working copy
    shares) is the only one, so the peak stays near that of the model in memory — measured as each process's
    resident anonymous memory (sampled every 2 ms; reading an offload folder maps its files, whose page cache
    is not the pass's memory), after building the model and at the peak of the pass."""
    import subprocess
    import sys
    from pathlib import Path

    here = str(Path(__file__).parent)
    ns: dict = {}
    exec(_BIG.format(here=here), ns)
    torch.manual_seed(0)
    accelerate.utils.offload_state_dict(str(tmp_path), ns["Big"]().state_dict())
    built, peak = {}, {}
    for folder in ("", str(tmp_path)):
        out = subprocess.run([sys.executable, "-c", _PEAK.format(here=here, folder=folder)], capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        built[bool(folder)], peak[bool(folder)] = map(int, out.stdout.split()[-2:])
    print(f"anonymous memory after building / peak: in memory {built[False]} / {peak[False]} MB, disk-offloaded "
          f"{built[True]} / {peak[True]} MB")  # pytest -s
    assert peak[False] < built[False] + 250, (built, peak)  # no second copy of the 400 MB
    assert peak[True] < built[False] + 250, (built, peak)  # the gathered copy is the only one
